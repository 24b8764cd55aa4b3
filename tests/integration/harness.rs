//! Smoke tests for the shared integration-test harness in `tests/common`.

use crate::common;

use std::time::Duration;

use common::{port_accepts, NatsServer, S3Server};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn nats_server_starts_and_sends_info() {
    let nats = NatsServer::start().await;
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));

    let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port()))
        .await
        .expect("connect to nats-server");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(stream).read_line(&mut line),
    )
    .await
    .expect("INFO line within 5 s")
    .expect("read INFO line");
    assert!(
        line.starts_with("INFO {"),
        "unexpected first line: {line:?}"
    );

    let port = nats.port();
    drop(nats);
    assert!(
        !port_accepts(port).await,
        "nats-server still running after drop"
    );
}

#[tokio::test]
async fn nats_server_jetstream_starts() {
    let nats = NatsServer::start_jetstream().await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port()))
        .await
        .expect("connect to nats-server");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(stream).read_line(&mut line),
    )
    .await
    .expect("INFO line within 5 s")
    .expect("read INFO line");
    assert!(
        line.contains("\"jetstream\":true"),
        "JetStream not enabled: {line}"
    );
}

#[tokio::test]
async fn s3_server_stops_and_restarts_on_same_port() {
    let mut s3 = S3Server::start().await;
    let port = s3.port();
    assert_eq!(s3.endpoint(), format!("http://127.0.0.1:{port}"));
    assert_eq!(s3.bucket(), "ringvault-test");
    assert_eq!(s3.region(), "us-east-1");
    assert!(s3.bucket_dir().is_dir());
    assert!(port_accepts(port).await);

    s3.stop().await;
    assert!(!port_accepts(port).await, "port still accepts after stop");
    assert!(s3.bucket_dir().is_dir(), "bucket dir removed by stop");

    s3.restart().await;
    assert_eq!(s3.port(), port, "restart changed the port");
    assert!(port_accepts(port).await, "port refuses after restart");
    assert!(s3.bucket_dir().is_dir(), "bucket dir missing after restart");

    drop(s3);
    assert!(!port_accepts(port).await, "s3s-fs still running after drop");
}
