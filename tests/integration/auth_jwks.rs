//! Identity-provider JWTs (RS256, ES256, EdDSA) over the real NATS path, against a JWKS served
//! over loopback HTTP: each failure mode, algorithm confusion, revocation, a key rotation while
//! the service runs, and a failing refresh that keeps the last good keys.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::service::{eventually, TestEnv};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use ringvault::client::Client;
use ringvault::protocol::Format;
use ringvault::Kind;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "ringvault";

/// A tiny HTTP/1.1 responder on 127.0.0.1 answering every request with the current status and
/// body.
struct JwksServer {
    url: String,
    answer: Arc<Mutex<(u16, String)>>,
    /// Requests answered so far.
    fetches: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let answer = Arc::new(Mutex::new((200, body)));
        let shared = answer.clone();
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = fetches.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => request.extend_from_slice(&buffer[..read]),
                        }
                    }
                    let (status, body) = shared.lock().unwrap().clone();
                    let reason = if status == 200 { "OK" } else { "Error" };
                    let response = format!(
                        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        JwksServer {
            url,
            answer,
            fetches,
            task,
        }
    }

    fn set(&self, status: u16, body: String) {
        *self.answer.lock().unwrap() = (status, body);
    }

    /// Waits until the service has fetched the current answer twice (it refreshes every
    /// second in these tests), so that what follows sees its effect.
    async fn fetched_twice(&self) {
        let seen = self.fetches.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            eventually(Duration::from_secs(10), || async {
                self.fetches.load(std::sync::atomic::Ordering::SeqCst) >= seen + 2
            })
            .await,
            "the jwks was not fetched again"
        );
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

struct SigningKey {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: serde_json::Value,
}

fn rsa_key(kid: &str) -> SigningKey {
    let pem = std::fs::read("tests/data/jwt_rsa_private.pem").unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    let mut jwk = serde_json::to_value(jwk).unwrap();
    jwk["kid"] = kid.into();
    jwk["use"] = "sig".into();
    SigningKey {
        alg: Algorithm::RS256,
        kid: kid.into(),
        key,
        jwk,
    }
}

fn ec_key(kid: &str) -> SigningKey {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    SigningKey {
        alg: Algorithm::ES256,
        kid: kid.into(),
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }),
    }
}

fn ed_key(kid: &str) -> SigningKey {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    SigningKey {
        alg: Algorithm::EdDSA,
        kid: kid.into(),
        key: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid,
            "x": b64(pair.public_key().as_ref()),
        }),
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::json!({ "keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>() })
        .to_string()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims() -> serde_json::Value {
    serde_json::json!({
        "sub": "user-1",
        "tenant_id": "ws_1",
        "scope": "openid encrypt decrypt",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now() + 600,
        "iat": now(),
        "jti": hex::encode(rand::random::<[u8; 12]>()),
    })
}

fn sign(key: &SigningKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.key).unwrap()
}

async fn kind_of(client: &Client, token: &str) -> Result<(), Kind> {
    client
        .with_token(Some(token.to_owned()))
        .encrypt("ws_1/app", "hello")
        .await
        .map(|_| ())
        .map_err(|error| error.kind())
}

fn service_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("RINGVAULT_AUTH_JWT_JWKS_URL", url.to_owned()),
        ("RINGVAULT_AUTH_JWT_JWKS_REFRESH_SECS", "1".to_owned()),
        ("RINGVAULT_AUTH_JWT_ISSUER", ISSUER.to_owned()),
        ("RINGVAULT_AUTH_JWT_AUDIENCE", AUDIENCE.to_owned()),
        ("RINGVAULT_AUTH_LEEWAY_SECS", "2".to_owned()),
        // Signed tokens on too, so that an HS256 confusion token has somewhere to go.
        (
            "RINGVAULT_AUTH_SIGNING_SECRETS",
            "signing-secret-for-the-jwks-test-0123".to_owned(),
        ),
    ]
}

fn pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_algorithm_and_each_failure_mode() {
    let rsa = rsa_key("rsa-1");
    let ec = ec_key("ec-1");
    let ed = ed_key("ed-1");
    let server = JwksServer::start(jwks(&[&rsa, &ec, &ed])).await;
    let env = TestEnv::start().await;
    let settings = service_env(&server.url);
    let service = env.service(&pairs(&settings)).await;
    let client = env.client(Format::Json).await;

    for key in [&rsa, &ec, &ed] {
        let valid = sign(key, &claims());
        assert_eq!(kind_of(&client, &valid).await, Ok(()), "{:?}", key.alg);
        let mut without_kid = Header::new(key.alg);
        without_kid.kid = None;
        let token = jsonwebtoken::encode(&without_kid, &claims(), &key.key).unwrap();
        assert_eq!(
            kind_of(&client, &token).await,
            Ok(()),
            "{:?} no kid",
            key.alg
        );

        let mut expired = claims();
        expired["exp"] = (now() - 600).into();
        assert_eq!(
            kind_of(&client, &sign(key, &expired)).await,
            Err(Kind::TokenExpired),
            "{:?}",
            key.alg
        );
        let mut early = claims();
        early["nbf"] = (now() + 600).into();
        assert_eq!(
            kind_of(&client, &sign(key, &early)).await,
            Err(Kind::InvalidToken)
        );
        let mut wrong_audience = claims();
        wrong_audience["aud"] = "someone-else".into();
        assert_eq!(
            kind_of(&client, &sign(key, &wrong_audience)).await,
            Err(Kind::InvalidToken)
        );
        let mut wrong_issuer = claims();
        wrong_issuer["iss"] = "https://evil.test".into();
        assert_eq!(
            kind_of(&client, &sign(key, &wrong_issuer)).await,
            Err(Kind::InvalidToken)
        );
        // Bad signature: the payload of one token with the signature of another.
        let one = sign(key, &claims());
        let mut other_claims = claims();
        other_claims["scope"] = "admin".into();
        let other = sign(key, &other_claims);
        let forged = format!(
            "{}.{}.{}",
            one.split('.').next().unwrap(),
            other.split('.').nth(1).unwrap(),
            one.split('.').nth(2).unwrap()
        );
        assert_eq!(kind_of(&client, &forged).await, Err(Kind::InvalidToken));
    }
    // A key the JWKS does not have, under a kid it does.
    let impostor = ec_key("ec-1");
    assert_eq!(
        kind_of(&client, &sign(&impostor, &claims())).await,
        Err(Kind::InvalidToken)
    );

    // alg: none.
    let header = b64(serde_json::json!({"alg": "none", "kid": "rsa-1"})
        .to_string()
        .as_bytes());
    let payload = b64(claims().to_string().as_bytes());
    assert_eq!(
        kind_of(&client, &format!("{header}.{payload}.")).await,
        Err(Kind::InvalidToken)
    );
    // Algorithm confusion: HS256 "signed" with the RSA public key (PEM and JWK modulus).
    let public_pem = std::fs::read("tests/data/jwt_rsa_public.pem").unwrap();
    let modulus = rsa.jwk["n"].as_str().unwrap().as_bytes().to_vec();
    for secret in [public_pem, modulus] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        let confused =
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(&secret)).unwrap();
        assert_eq!(kind_of(&client, &confused).await, Err(Kind::InvalidToken));
    }

    // Revoked by jti, through the library call of `ringvault token revoke`.
    let revocable_claims = claims();
    let revocable = sign(&ec, &revocable_claims);
    assert_eq!(kind_of(&client, &revocable).await, Ok(()));
    let config = env.config(&pairs(&settings));
    let storage = ringvault::server::open_backend(&config).await.unwrap();
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    ringvault::auth::revoke(
        &*storage,
        &nats,
        &config.nats.prefix,
        revocable_claims["jti"].as_str().unwrap(),
    )
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            kind_of(&client, &revocable).await == Err(Kind::InvalidToken)
        })
        .await,
        "revoked jwt still accepted after 10 s"
    );

    // Revoked by its text, without a jti: the token's other ECDSA signature (s → n − s), which
    // verifies just as well, is the same revoked token.
    let mut no_jti = claims();
    no_jti.as_object_mut().unwrap().remove("jti");
    let original = sign(&ec, &no_jti);
    let twin = with_other_ecdsa_signature(&original);
    assert_ne!(twin, original);
    assert_eq!(kind_of(&client, &twin).await, Ok(()), "the twin verifies");
    ringvault::auth::revoke(&*storage, &nats, &config.nats.prefix, &original)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            kind_of(&client, &original).await == Err(Kind::InvalidToken)
        })
        .await,
        "revoked jwt still accepted after 10 s"
    );
    assert_eq!(kind_of(&client, &twin).await, Err(Kind::InvalidToken));
    service.shutdown().await.unwrap();
}

/// `token` (ES256) with its signature `r || s` replaced by `r || n − s`, the other signature
/// ECDSA accepts for the same message and key.
fn with_other_ecdsa_signature(token: &str) -> String {
    const P256_ORDER: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature)
        .unwrap();
    assert_eq!(signature.len(), 64);
    let mut borrow = 0i16;
    for index in (0..32).rev() {
        let difference = i16::from(P256_ORDER[index]) - i16::from(signature[32 + index]) - borrow;
        borrow = i16::from(difference < 0);
        signature[32 + index] = (difference + (borrow << 8)) as u8;
    }
    format!("{signed}.{}", b64(&signature))
}

/// A token naming a `kid` the loaded set lacks makes the service read the JWKS again long
/// before the periodic refresh (five minutes here).
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_kid_reads_the_jwks_again() {
    let first = ec_key("ec-1");
    let second = ec_key("ec-2");
    let server = JwksServer::start(jwks(&[&first])).await;
    let env = TestEnv::start().await;
    let mut settings = service_env(&server.url);
    for (name, value) in &mut settings {
        if *name == "RINGVAULT_AUTH_JWT_JWKS_REFRESH_SECS" {
            *value = "300".to_owned();
        }
    }
    let service = env.service(&pairs(&settings)).await;
    let client = env.client(Format::Json).await;
    assert_eq!(kind_of(&client, &sign(&first, &claims())).await, Ok(()));

    server.set(200, jwks(&[&first, &second]));
    let token = sign(&second, &claims());
    assert_eq!(
        kind_of(&client, &token).await,
        Err(Kind::InvalidToken),
        "ec-2 was not in the set loaded at start"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            kind_of(&client, &token).await == Ok(())
        })
        .await,
        "the new kid is not accepted within 5 s of its first use"
    );
    service.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_rotation_while_running_and_failing_refresh_keeps_last_good_keys() {
    let first = ec_key("ec-1");
    let second = ec_key("ec-2");
    let server = JwksServer::start(jwks(&[&first])).await;
    let env = TestEnv::start().await;
    let settings = service_env(&server.url);
    let service = env.service(&pairs(&settings)).await;
    let client = env.client(Format::Json).await;

    let cached_first = sign(&first, &claims());
    assert_eq!(kind_of(&client, &cached_first).await, Ok(()));
    assert_eq!(
        kind_of(&client, &sign(&second, &claims())).await,
        Err(Kind::InvalidToken),
        "ec-2 is not published yet"
    );

    // The IdP rotates: ec-2 published, ec-1 retired.
    server.set(200, jwks(&[&second]));
    assert!(
        eventually(Duration::from_secs(5), || async {
            // A fresh token each time, so that no cache answers.
            kind_of(&client, &sign(&second, &claims())).await == Ok(())
        })
        .await,
        "the new kid is not accepted after the refresh"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            kind_of(&client, &sign(&first, &claims())).await == Err(Kind::InvalidToken)
        })
        .await,
        "the retired kid is still accepted"
    );
    assert_eq!(
        kind_of(&client, &cached_first).await,
        Err(Kind::InvalidToken),
        "a token of the retired kid verified before is no longer taken from the cache"
    );

    // The IdP fails: the last good set stays.
    server.set(500, "internal error".to_owned());
    server.fetched_twice().await;
    assert_eq!(kind_of(&client, &sign(&second, &claims())).await, Ok(()));
    // And garbage is not a key set either.
    server.set(200, "{\"keys\": []}".to_owned());
    server.fetched_twice().await;
    assert_eq!(kind_of(&client, &sign(&second, &claims())).await, Ok(()));
    service.shutdown().await.unwrap();
}
