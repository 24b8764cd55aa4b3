//! Health and metrics over HTTP with role tokens: every 401 and 403 case, counters moving,
//! and the refusal to start without a token secret.

mod common;

use std::time::Duration;

use common::service::TestEnv;
use ringvault::auth::{Claims, SignedTokens};
use ringvault::protocol::Format;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SECRET: &str = "http-role-token-secret-of-at-least-32-bytes";

fn role_token(secret: &str, roles: &[&str], audience: Option<&str>, ttl: Duration) -> String {
    let tokens = SignedTokens::new(
        &[secret.as_bytes()],
        "ringvault",
        audience.map(str::to_owned),
        Duration::from_secs(0),
        "tenant_id",
    )
    .unwrap();
    let mut claims = Claims::new("prometheus", ttl);
    claims.roles = roles.iter().map(|role| role.to_string()).collect();
    if let Some(audience) = audience {
        claims.aud = vec![audience.to_owned()];
    }
    tokens.issue(&claims).unwrap()
}

/// A minimal HTTP/1.1 GET: status and body.
async fn get(address: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn counter_sum(metrics: &str, name: &str, must_contain: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && line.contains(must_contain))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn health_and_metrics_need_their_roles() {
    let env = TestEnv::start().await;
    let server = env
        .service(&[
            ("RINGVAULT_HTTP_LISTEN", "127.0.0.1:0"),
            ("RINGVAULT_HTTP_TOKEN_SECRET", SECRET),
            ("RINGVAULT_HTTP_AUDIENCE", "ringvault-ops"),
        ])
        .await;
    let address = server.http_address().unwrap();
    let hour = Duration::from_secs(3600);
    let health_only = role_token(
        SECRET,
        &["runtime.health:read"],
        Some("ringvault-ops"),
        hour,
    );
    let both = role_token(
        SECRET,
        &["runtime.health:read", "runtime.metrics:read"],
        Some("ringvault-ops"),
        hour,
    );

    assert_eq!(get(address, "/health/live", None).await, (200, "ok".into()));

    // 401: missing, malformed, wrong secret, wrong audience, expired.
    let wrong_secret = role_token(
        "another-secret-that-is-also-32-bytes-long",
        &["runtime.health:read"],
        Some("ringvault-ops"),
        hour,
    );
    let wrong_audience = role_token(SECRET, &["runtime.health:read"], Some("elsewhere"), hour);
    for token in [
        None,
        Some("garbage"),
        Some(wrong_secret.as_str()),
        Some(wrong_audience.as_str()),
    ] {
        let (status, body) = get(address, "/health", token).await;
        assert_eq!(status, 401, "{token:?}: {body}");
    }
    let expired = {
        let tokens = SignedTokens::new(
            &[SECRET.as_bytes()],
            "ringvault",
            Some("ringvault-ops".into()),
            Duration::from_secs(0),
            "tenant_id",
        )
        .unwrap();
        let mut claims = Claims::new("prometheus", hour);
        claims.roles = vec!["runtime.health:read".into()];
        claims.aud = vec!["ringvault-ops".into()];
        claims.exp = claims.iat.unwrap_or(0).saturating_sub(3600);
        claims.nbf = None;
        tokens.issue(&claims).unwrap()
    };
    let (status, body) = get(address, "/health", Some(&expired)).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token_expired"), "{body}");

    // 403: valid token without the role.
    let no_roles = role_token(SECRET, &[], Some("ringvault-ops"), hour);
    assert_eq!(get(address, "/health", Some(&no_roles)).await.0, 403);
    assert_eq!(get(address, "/metrics", Some(&health_only)).await.0, 403);

    let (status, body) = get(address, "/health", Some(&health_only)).await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "ok", "{report}");
    assert_eq!(report["actors"]["gateway"], "up");

    // Counters move.
    let (status, before) = get(address, "/metrics", Some(&both)).await;
    assert_eq!(status, 200);
    let client = env.client(Format::Protobuf).await;
    for _ in 0..5 {
        client.encrypt("ws_metrics", "x").await.unwrap();
    }
    let _ = client
        .with_token(Some("wrong".into()))
        .encrypt("ws_metrics", "x")
        .await;
    let (_, after) = get(address, "/metrics", Some(&both)).await;
    let encrypts = |text: &str| {
        counter_sum(
            text,
            "ringvault_requests_total",
            "method=\"Encrypt\",code=\"ok\"",
        )
    };
    assert_eq!(encrypts(&after) - encrypts(&before), 5.0, "{after}");
    assert!(counter_sum(&after, "ringvault_auth_failures_total", "invalid_token") >= 1.0);
    assert!(counter_sum(&after, "ringvault_cache_hits_total", "") >= 4.0);
    assert!(
        after.contains("ringvault_request_duration_seconds_bucket"),
        "histograms"
    );
    assert!(counter_sum(&after, "ringvault_rotations_total", "first_use") >= 1.0);
    assert!(after.contains("ringvault_cache_keys"));
    // The first Encrypt of ws_metrics missed the cache, created its key (storage writes) and
    // announced it.
    assert!(counter_sum(&after, "ringvault_cache_misses_total", "latest") >= 1.0);
    assert!(
        counter_sum(&after, "ringvault_storage_duration_seconds_count", "") >= 2.0,
        "{after}"
    );
    assert!(counter_sum(&after, "ringvault_events_published_total", "") >= 1.0);
    assert!(counter_sum(&after, "ringvault_cache_keyrings", "") >= 1.0);
    assert!(after.contains("\nringvault_nats_reconnects "), "{after}");
    assert_eq!(counter_sum(&after, "ringvault_nats_reconnects", ""), 0.0);

    // A second replica's rotation reaches this one, which caches ws_metrics: one applied event.
    let applied = |text: &str| counter_sum(text, "ringvault_events_applied_total", "");
    let other = env.service(&[]).await;
    other.keyrings().rotate("ws_metrics").await.unwrap();
    let mut applied_after = 0.0;
    for _ in 0..500 {
        let (_, now) = get(address, "/metrics", Some(&both)).await;
        applied_after = applied(&now);
        if applied_after > applied(&after) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(applied_after > applied(&after), "no event applied");
    other.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
}

/// `/health` answers 503 with `"status": "degraded"` once the NATS connection is down, while
/// `/health/live` still answers 200.
#[tokio::test]
async fn health_is_degraded_while_nats_is_down() {
    let mut env = TestEnv::start().await;
    let server = env
        .service(&[
            ("RINGVAULT_HTTP_LISTEN", "127.0.0.1:0"),
            ("RINGVAULT_HTTP_TOKEN_SECRET", SECRET),
        ])
        .await;
    let address = server.http_address().unwrap();
    let token = role_token(
        SECRET,
        &["runtime.health:read"],
        None,
        Duration::from_secs(3600),
    );
    let (status, body) = get(address, "/health", Some(&token)).await;
    assert_eq!(status, 200, "{body}");

    env.nats.kill().await;
    let mut last = (0, String::new());
    for _ in 0..500 {
        last = get(address, "/health", Some(&token)).await;
        if last.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = last;
    assert_eq!(status, 503, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "degraded", "{report}");
    assert_eq!(report["nats"], "disconnected", "{report}");
    // Liveness is the process, not its dependencies.
    assert_eq!(get(address, "/health/live", None).await, (200, "ok".into()));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_http_server_refuses_to_start_without_its_secret() {
    let env = TestEnv::start().await;
    for secret in ["", "too-short"] {
        let error = ringvault::config::Config::from_sources(
            None,
            [
                ("RINGVAULT_HTTP_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
                ("RINGVAULT_HTTP_TOKEN_SECRET".to_owned(), secret.to_owned()),
                ("RINGVAULT_NATS_URL".to_owned(), env.nats.url()),
            ],
        )
        .unwrap_err();
        assert!(error.to_string().contains("http.token_secret"), "{error}");
    }
}

/// `ringvault token revoke` reaches role tokens too: a revoked one is refused soon after.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_role_token_is_refused() {
    let env = TestEnv::start().await;
    let settings = [
        ("RINGVAULT_HTTP_LISTEN", "127.0.0.1:0"),
        ("RINGVAULT_HTTP_TOKEN_SECRET", SECRET),
    ];
    let server = env.service(&settings).await;
    let address = server.http_address().unwrap();
    let hour = Duration::from_secs(3600);
    let roles = ["runtime.health:read", "runtime.metrics:read"];
    let revoked = role_token(SECRET, &roles, None, hour);
    let kept = role_token(SECRET, &roles, None, hour);
    assert_eq!(get(address, "/metrics", Some(&revoked)).await.0, 200);

    let config = env.config(&settings);
    let storage = ringvault::server::open_backend(&config).await.unwrap();
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    ringvault::auth::revoke(&*storage, &nats, &config.nats.prefix, &revoked)
        .await
        .unwrap();
    assert!(
        common::service::eventually(Duration::from_secs(10), || async {
            get(address, "/metrics", Some(&revoked)).await.0 == 401
        })
        .await,
        "the revoked role token still passes"
    );
    let (_, body) = get(address, "/metrics", Some(&revoked)).await;
    assert!(body.contains("revoked"), "{body}");
    assert_eq!(get(address, "/metrics", Some(&kept)).await.0, 200);
    server.shutdown().await.unwrap();
}

/// A role token revoked before the service starts is refused from the endpoint's first answer:
/// the stored revocations load before the HTTP listener opens, not after.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_token_revoked_before_start_is_refused_from_the_first_answer() {
    // On S3 the storage actor's start (probing the store) takes long enough for the endpoint
    // to be asked before the auth actor starts, had the endpoint opened first.
    let env = TestEnv::start_s3().await;
    let listen = format!("127.0.0.1:{}", common::free_port());
    let settings = [
        ("RINGVAULT_HTTP_LISTEN", listen.as_str()),
        ("RINGVAULT_HTTP_TOKEN_SECRET", SECRET),
    ];
    let config = env.config(&settings);
    let hour = Duration::from_secs(3600);
    let roles = ["runtime.health:read", "runtime.metrics:read"];
    let revoked = role_token(SECRET, &roles, None, hour);
    let storage = ringvault::server::open_backend(&config).await.unwrap();
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    ringvault::auth::revoke(&*storage, &nats, &config.nats.prefix, &revoked)
        .await
        .unwrap();

    let starting = tokio::spawn(async move { common::service::start_server(&config).await });
    let address: std::net::SocketAddr = listen.parse().unwrap();
    let mut answers_while_starting = Vec::new();
    while !starting.is_finished() {
        // Asked as soon as the listener accepts, while the rest of the service starts.
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            answers_while_starting.push(get(address, "/metrics", Some(&revoked)).await.0);
        } else {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let server = starting.await.unwrap();
    assert!(
        answers_while_starting.iter().all(|&status| status == 401),
        "answers during start: {answers_while_starting:?}"
    );
    assert_eq!(get(address, "/metrics", Some(&revoked)).await.0, 401);
    server.shutdown().await.unwrap();
}

/// A client that opens a connection to the endpoint and sends half a request does not hold the
/// shutdown: the endpoint gets a short grace, then its connections are closed.
#[tokio::test(flavor = "multi_thread")]
async fn a_half_sent_http_request_does_not_hold_the_shutdown() {
    let env = TestEnv::start().await;
    let server = env
        .service(&[
            ("RINGVAULT_HTTP_LISTEN", "127.0.0.1:0"),
            ("RINGVAULT_HTTP_TOKEN_SECRET", SECRET),
        ])
        .await;
    let mut stalled = tokio::net::TcpStream::connect(server.http_address().unwrap())
        .await
        .unwrap();
    stalled.write_all(b"G").await.unwrap();
    // Let the endpoint take the connection and start reading the request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = tokio::time::timeout(Duration::from_secs(20), server.shutdown()).await;
    assert!(
        stopped.is_ok(),
        "shutdown still waits for the half-sent request after 20 s"
    );
    stopped.unwrap().unwrap();
    drop(stalled);
}

struct AlwaysUp;

impl ringvault::http::HealthSource for AlwaysUp {
    fn report(&self) -> (serde_json::Value, bool) {
        (serde_json::json!({"status": "up"}), true)
    }
}

/// Before the stored revocations are loaded a role token cannot be checked against them: the
/// endpoint answers 503 `unavailable` (the service's state), not 401 (the caller's fault).
#[tokio::test]
async fn before_the_revocations_load_role_tokens_get_503() {
    let tokens = SignedTokens::new(
        &[SECRET.as_bytes()],
        "ringvault",
        None,
        Duration::from_secs(0),
        "tenant_id",
    )
    .unwrap();
    let revocations = std::sync::Arc::new(ringvault::auth::Revocations::until_loaded());
    let router =
        ringvault::http::router(tokens, revocations.clone(), std::sync::Arc::new(AlwaysUp));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(ringvault::http::serve(
        listener,
        router,
        std::future::pending(),
    ));
    let token = role_token(
        SECRET,
        &["runtime.health:read"],
        None,
        Duration::from_secs(600),
    );
    let (status, body) = get(address, "/health", Some(&token)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unavailable"), "{body}");
    revocations.mark_loaded();
    let (status, body) = get(address, "/health", Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    server.abort();
}
