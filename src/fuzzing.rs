//! Entry points of the fuzz targets in `fuzz/` (`just fuzz <target>`), one per decoder of bytes
//! that callers, identity providers, the bucket or anyone on the NATS account control. Each
//! must return on any input, never panic; the property tests below run every one on random and
//! on mutated well-formed inputs in `just test`, and the fuzz targets run them for as long as
//! one likes.

use std::sync::OnceLock;
use std::time::Duration;

use prost::Message as _;

use crate::auth::{
    bearer_token, parse_grants, Authenticator, CredentialSource, JwksSource, JwtVerifier, KeySet,
    Principal, Revocation, SignedTokens, StaticToken, StaticTokens,
};
use crate::crypto::{validate_envelope, Dek, Kek, MasterKeys};
use crate::protocol::{
    borrow_keyring_and_text, decode, decode_envelope, DecryptBulkRequest, DecryptRequest,
    DekCreated, DescribeKeyringRequest, EncryptBulkRequest, EncryptRequest,
    EncryptedDataEncryptionKey, Format, KekRolled, LivenessRequest, ReEncryptRequest,
    RotateKeyringRequest,
};

/// The keys and verifiers the targets check against, made once per process.
struct Fixture {
    dek: Dek,
    master_keys: MasterKeys,
    authenticator: Authenticator,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let jwt = JwtVerifier::new(
            JwksSource::File("unused".into()),
            KeySet::parse(FUZZ_JWKS.as_bytes()).expect("a valid jwks"),
            Duration::from_secs(3600),
            Some("https://idp.example".into()),
            Some("ringvault".into()),
            Duration::from_secs(5),
            "tenant_id",
        )
        .expect("a jwt verifier");
        let static_principal = Principal {
            workspace: Some("ws_1".into()),
            subject: "fuzz".into(),
            source: CredentialSource::StaticToken,
            permissions: parse_grants(&["encrypt"]).expect("a valid grant"),
        };
        // Fixed keys, the same in every run: a key id the fuzzer finds once (compared as
        // bytes, which libFuzzer traces) leads it past the lookup to the AEAD every time.
        Fixture {
            dek: Dek::from_parts(FUZZ_DEK_ID.into(), 1, &[7; 32]).expect("a valid dek"),
            master_keys: MasterKeys::new(Kek::parse(FUZZ_MASTER_KEY).expect("a valid kek"), [])
                .expect("one master key"),
            authenticator: Authenticator::new(StaticTokens::new(vec![StaticToken::new(
                "fuzz-static-token",
                static_principal,
            )]))
            .with_signed_tokens(signed_tokens())
            .with_jwt(jwt),
        }
    })
}

/// The token target's HS256 source (its tests issue tokens with it).
fn signed_tokens() -> SignedTokens {
    SignedTokens::new(
        &[FUZZ_SIGNING_SECRET.as_bytes()],
        "ringvault",
        None,
        Duration::from_secs(5),
        "tenant_id",
    )
    .expect("a valid signing secret")
}

/// The envelope target's DEK id and the stored-key target's master key (`ringvault keygen`).
const FUZZ_DEK_ID: &str = "dek_fuzz";
const FUZZ_MASTER_KEY: &str =
    "ChprZWtfbVZ1R2dPY0xPdTFSbk9ZVzBxNjA4dBDKrqbboDQaIAeSz3L/wEHNmnkCRlx867gpPDxfLelh1DYN56UXeBI+";

/// The HS256 secret of the token target's signed-token source.
pub const FUZZ_SIGNING_SECRET: &str = "fuzzing-signing-secret-of-32-bytes!!";

/// The token target's JWKS: an RSA key, an ES256 key (a point on P-256) and an Ed25519 key
/// (the examples of RFC 7517 and RFC 8037).
const FUZZ_JWKS: &str = r#"{"keys":[
  {"kty":"RSA","kid":"rsa","use":"sig","alg":"RS256","e":"AQAB",
   "n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"},
  {"kty":"EC","crv":"P-256","kid":"ec","use":"sig","alg":"ES256",
   "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
  {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
]}"#;

/// A request body (the first byte picks the format), decoded as every request message; and
/// wherever the in-place read of Encrypt and Decrypt answers, prost answers the same.
pub fn request(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let format = if selector & 1 == 0 {
        Format::Protobuf
    } else {
        Format::Json
    };
    let encrypt = decode::<EncryptRequest>(format, body);
    let decrypt = decode::<DecryptRequest>(format, body);
    if let (Format::Protobuf, Some((keyring, text))) = (format, borrow_keyring_and_text(body)) {
        let encrypt = encrypt.expect("prost reads what the in-place read reads");
        let decrypt = decrypt.expect("prost reads what the in-place read reads");
        assert_eq!((keyring, text), (&*encrypt.keyring, &*encrypt.data));
        assert_eq!((keyring, text), (&*decrypt.keyring, &*decrypt.encrypted));
    }
    let _ = decode::<EncryptBulkRequest>(format, body);
    let _ = decode::<DecryptBulkRequest>(format, body);
    let _ = decode::<ReEncryptRequest>(format, body);
    let _ = decode::<RotateKeyringRequest>(format, body);
    let _ = decode::<DescribeKeyringRequest>(format, body);
    let _ = decode::<LivenessRequest>(format, body);
}

/// The one plaintext the targets' key ever seals (in the tests' samples).
const SEALED_PLAINTEXT: &[u8] = b"hello";

/// An envelope as Decrypt takes it: base64 text, its protobuf, the checks before any key is
/// looked up, then an open, which yields nothing but what the key sealed.
pub fn envelope(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(envelope) = decode_envelope(&text) else {
        return;
    };
    if validate_envelope(&envelope).is_err() {
        return;
    }
    if let Ok(plaintext) = fixture().dek.open(envelope) {
        assert_eq!(
            plaintext, SEALED_PLAINTEXT,
            "an envelope opened to what was never sealed"
        );
    }
}

/// A stored DEK object (`keyring/<keyring>/<dek_id>` or `LATEST`) as read from the bucket,
/// decoded and opened with the master key.
pub fn stored_key(data: &[u8]) {
    let Ok(stored) = EncryptedDataEncryptionKey::decode(data) else {
        return;
    };
    let _ = fixture().master_keys.open_dek(&stored);
}

/// An `Authorization` header value, through every credential source: static tokens, HS256
/// signed tokens and identity-provider JWTs.
pub fn token(data: &[u8]) {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    // The header's parsing, then the token with or without it (so that the fuzzer need not
    // find the `Bearer ` prefix before it can reach the JWT parsers).
    let token = bearer_token(Some(header)).unwrap_or(header);
    let _ = fixture().authenticator.verify(token);
}

/// A JWKS document as an identity provider serves it.
pub fn jwks(data: &[u8]) {
    let _ = KeySet::parse(data);
}

/// A message from the events or revocations subjects: a key event, a roll announcement or a
/// revocation.
pub fn event(data: &[u8]) {
    let _ = serde_json::from_slice::<DekCreated>(data);
    let _ = serde_json::from_slice::<KekRolled>(data);
    if let Ok(revocation) = serde_json::from_slice::<Revocation>(data) {
        let _ = revocation.object_key();
        let _ = revocation.describe();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::auth::Claims;

    type Target = fn(&[u8]);

    /// Well-formed inputs of each target, for the mutations below to start from.
    fn samples() -> Vec<(Target, Vec<u8>)> {
        let sealed = fixture().dek.seal_envelope(SEALED_PLAINTEXT);
        let envelope_sample = crate::protocol::envelope_text(&sealed);
        let stored = fixture()
            .master_keys
            .seal_dek(&Dek::generate())
            .encode_to_vec();
        let signed = signed_tokens();
        let mut claims = Claims::new("svc", Duration::from_secs(600));
        claims.workspace = Some("ws_1".into());
        claims.permissions = vec!["encrypt".into()];
        let header = format!("Bearer {}", signed.issue(&claims).unwrap());
        let encrypt = crate::protocol::encode(
            Format::Protobuf,
            &EncryptRequest {
                keyring: "ws_1".into(),
                data: "hello".into(),
            },
        );
        let mut request_body = vec![0];
        request_body.extend_from_slice(&encrypt);
        let event_sample = br#"{"version":1,"keyring":"ws_1","key_id":"dek_1","cause":"manual","time":1,"replica":"r"}"#;
        vec![
            (request as Target, request_body),
            (envelope as Target, envelope_sample.into_bytes()),
            (stored_key as Target, stored),
            (token as Target, header.into_bytes()),
            (jwks as Target, FUZZ_JWKS.as_bytes().to_vec()),
            (event as Target, event_sample.to_vec()),
        ]
    }

    #[test]
    fn the_samples_are_accepted_where_they_should_be() {
        let sealed = fixture().dek.seal_envelope(SEALED_PLAINTEXT);
        let envelope = decode_envelope(&crate::protocol::envelope_text(&sealed)).unwrap();
        assert_eq!(fixture().dek.open(envelope).unwrap(), SEALED_PLAINTEXT);
        let stored = fixture().master_keys.seal_dek(&Dek::generate());
        assert!(fixture().master_keys.open_dek(&stored).is_ok());
        let (_, token) = &samples()[3];
        let header = std::str::from_utf8(token).unwrap();
        let principal = fixture()
            .authenticator
            .verify(bearer_token(Some(header)).unwrap())
            .unwrap();
        assert_eq!(principal.workspace.as_deref(), Some("ws_1"));
        assert_eq!(KeySet::parse(FUZZ_JWKS.as_bytes()).unwrap().len(), 3);
        assert!(fixture().authenticator.verify("fuzz-static-token").is_ok());
    }

    proptest! {
        #[test]
        fn no_target_panics_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            for target in [request, envelope, stored_key, token, jwks, event] {
                target(&data);
            }
        }

        #[test]
        fn no_target_panics_on_mutated_samples(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            for (target, sample) in samples() {
                let mut mutated = sample.clone();
                for (index, byte) in &flips {
                    let at = index.index(mutated.len().max(1));
                    if let Some(slot) = mutated.get_mut(at) {
                        *slot ^= byte;
                    }
                }
                target(&mutated);
                target(&sample[..cut.index(sample.len() + 1)]);
            }
        }
    }
}
