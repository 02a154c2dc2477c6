//! The stored form of a credential, shared by the stores that keep it outside the
//! process (Redis, a file): `v1:<fingerprint>:<json>`, or sealed with a key
//! `v1x:<fingerprint>:<base64 of nonce and ciphertext>`; the fingerprint a SHA-256 of the
//! headers (keyed when sealed), what compare-and-delete compares, never the secret.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, KeyInit, OsRng, Payload},
};
use http::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{credential::Credential, error::BoxError};

/// How values are written and read: the credential key's name (what a sealed value is
/// bound to) and the sealing key, if any.
#[derive(Clone)]
pub(crate) struct Codec {
    pub(crate) key_name: String,
    pub(crate) sealing: Option<Arc<Sealing>>,
}

pub(crate) struct Sealing {
    cipher: XChaCha20Poly1305,
    /// Keys the fingerprint, so that it tells nothing even of a short API key.
    salt: [u8; 32],
}

impl Sealing {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        let salt: [u8; 32] = Sha256::new()
            .chain_update(b"tower-client-auth fingerprint salt")
            .chain_update(key)
            .finalize()
            .into();
        Sealing {
            cipher: XChaCha20Poly1305::new(&key.into()),
            salt,
        }
    }
}

impl Codec {
    /// The stored form of `credential`: `v1:<fingerprint>:<json>`, or with a key
    /// `v1x:<fingerprint>:<base64 of nonce and sealed json>`.
    pub(crate) fn encode(&self, credential: &Credential) -> Result<String, BoxError> {
        if credential.is_bound() {
            // Its key never leaves this process: another would send it without a proof.
            return Err("a credential bound to a key (DPoP) is not shared through a store".into());
        }
        let fingerprint = self.fingerprint(credential);
        let json = document(credential);
        let Some(sealing) = &self.sealing else {
            return Ok(format!("v1:{fingerprint}:{json}"));
        };
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = sealing
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: json.as_bytes(),
                    aad: self.key_name.as_bytes(),
                },
            )
            .map_err(|_| "could not encrypt the credential")?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Ok(format!("v1x:{fingerprint}:{text}"))
    }

    /// The credential in `stored`, or why it cannot be read (never its content).
    pub(crate) fn decode(&self, stored: &str) -> Result<Credential, &'static str> {
        let (sealed, rest) = match (stored.strip_prefix("v1x:"), stored.strip_prefix("v1:")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err("written by another version"),
        };
        let (_, body) = rest.split_once(':').ok_or("malformed")?;
        match (&self.sealing, sealed) {
            (None, false) => parse(body),
            (None, true) => Err("encrypted, and this store has no key"),
            (Some(_), false) => Err("in plain text, and this store encrypts"),
            (Some(sealing), true) => {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(body)
                    .map_err(|_| "malformed")?;
                if bytes.len() < 24 {
                    return Err("malformed");
                }
                let (nonce, sealed) = bytes.split_at(24);
                let json = sealing
                    .cipher
                    .decrypt(
                        XNonce::from_slice(nonce),
                        Payload {
                            msg: sealed,
                            aad: self.key_name.as_bytes(),
                        },
                    )
                    .map_err(|_| "does not open with this store's key and key name")?;
                parse(std::str::from_utf8(&json).map_err(|_| "malformed")?)
            }
        }
    }

    /// The fingerprint in a stored form (between its first two colons), unchecked.
    #[cfg(feature = "file-store")]
    pub(crate) fn stored_fingerprint<'a>(&self, stored: &'a str) -> Option<&'a str> {
        let (_, rest) = stored.split_once(':')?;
        rest.split_once(':').map(|(fingerprint, _)| fingerprint)
    }

    /// A SHA-256 of the credential's headers, names and values (keyed when values are
    /// encrypted): equal for equal credentials, and telling nothing of the secret.
    pub(crate) fn fingerprint(&self, credential: &Credential) -> String {
        let mut hash = Sha256::new();
        if let Some(sealing) = &self.sealing {
            hash.update(sealing.salt);
        }
        for (name, value) in credential.headers() {
            hash.update(name.as_str().as_bytes());
            hash.update([0]);
            hash.update(value.as_bytes());
            hash.update([0]);
        }
        hex(&hash.finalize()[..16])
    }
}

/// The credential as JSON: its headers, expiry and issue time (milliseconds).
fn document(credential: &Credential) -> String {
    let headers: Vec<Value> = credential
        .headers()
        .map(
            |(name, value)| match std::str::from_utf8(value.as_bytes()) {
                Ok(text) => json!([name.as_str(), text]),
                // Bytes that are not UTF-8 (obs-text): kept byte for byte, never made lossy.
                Err(_) => json!([name.as_str(), {"b64": B64.encode(value.as_bytes())}]),
            },
        )
        .collect();
    json!({
        "h": headers,
        // A time past the year 9999 (a lifetime of centuries) is written as its last
        // millisecond: what `parse` reads, and as good as never for any credential.
        "exp": credential.expiry().map(|at| unix_millis(at).min(LAST_MILLI)),
        "iat": credential.issued().map(|at| unix_millis(at).min(LAST_MILLI)),
        "rt": credential.refresh_token().map(|t| t.expose()),
    })
    .to_string()
}

fn parse(json: &str) -> Result<Credential, &'static str> {
    const MALFORMED: &str = "malformed";
    let doc: Value = serde_json::from_str(json).map_err(|_| MALFORMED)?;
    let headers = doc["h"]
        .as_array()
        .ok_or(MALFORMED)?
        .iter()
        .map(|pair| {
            let name = pair[0].as_str().ok_or(MALFORMED)?;
            let value = match (&pair[1], pair[1]["b64"].as_str()) {
                (Value::String(text), _) => HeaderValue::from_str(text),
                (_, Some(bytes)) => {
                    HeaderValue::from_bytes(&B64.decode(bytes).map_err(|_| MALFORMED)?)
                }
                _ => return Err(MALFORMED),
            };
            Ok((
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| MALFORMED)?,
                value.map_err(|_| MALFORMED)?,
            ))
        })
        .collect::<Result<Vec<_>, &'static str>>()?;
    let mut credential = Credential::from_headers(headers).map_err(|_| MALFORMED)?;
    // A time is whole milliseconds within the clock's range, or absent: anything else
    // is refused (an unreadable expiry must never read as "does not expire").
    let time = |field: &Value| -> Result<Option<SystemTime>, &'static str> {
        match field {
            Value::Null => Ok(None),
            field => field
                .as_u64()
                .filter(|at| *at <= LAST_MILLI)
                .and_then(|at| UNIX_EPOCH.checked_add(Duration::from_millis(at)))
                .map(Some)
                .ok_or(MALFORMED),
        }
    };
    if let Some(at) = time(&doc["iat"])? {
        credential = credential.issued_at(at);
    }
    if let Some(at) = time(&doc["exp"])? {
        credential = credential.expires_at(at);
    }
    if let Some(token) = doc["rt"].as_str() {
        credential = credential.with_refresh_token(token);
    }
    Ok(credential)
}

/// The last millisecond of the year 9999: a stored time past it is garbage (and past what
/// some platforms' clocks hold).
const LAST_MILLI: u64 = 253_402_300_799_999;

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn unix_millis(at: SystemTime) -> u64 {
    millis(at.duration_since(UNIX_EPOCH).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(key_name: &str, key: Option<[u8; 32]>) -> Codec {
        Codec {
            key_name: key_name.into(),
            sealing: key.map(|key| Arc::new(Sealing::new(key))),
        }
    }

    fn credential() -> Credential {
        let issued = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        Credential::from_headers([
            (
                HeaderName::from_static("authorization"),
                HeaderValue::from_static("Bearer s3cr3t"),
            ),
            (
                HeaderName::from_static("x-tenant"),
                HeaderValue::from_static("t1"),
            ),
        ])
        .unwrap()
        .lives(issued, Duration::from_secs(3600))
        .with_refresh_token("rt-s3cr3t")
    }

    /// A credential survives the trip through its stored form, plain and sealed, expiry
    /// and issue time included (to the millisecond); the fingerprint names it without
    /// its secret.
    #[test]
    fn the_stored_form_round_trips_plain_and_sealed() {
        let credential = credential();
        for codec in [codec("k", None), codec("k", Some([1; 32]))] {
            let stored = codec.encode(&credential).unwrap();
            let back = codec.decode(&stored).unwrap();
            assert_eq!(back, credential);
            assert_eq!(back.expiry(), credential.expiry());
            assert_eq!(back.issued(), credential.issued());
            assert_eq!(back.refresh_token(), credential.refresh_token());
            let fingerprint = codec.fingerprint(&credential);
            assert!(stored.contains(&fingerprint));
            assert!(!fingerprint.contains("s3cr3t"));
        }
        let sealed = codec("k", Some([1; 32])).encode(&credential).unwrap();
        assert!(
            // Whole names only: a three-letter piece like "rt-" turns up in random
            // base64url now and then (this test failed once that way).
            !sealed.contains("s3cr3t") && !sealed.contains("x-tenant"),
            "{sealed}"
        );
        assert_ne!(
            codec("k", None).fingerprint(&credential),
            codec("k", Some([1; 32])).fingerprint(&credential),
            "the sealed fingerprint is keyed"
        );
    }

    /// A header value that is not UTF-8 (obs-text bytes, as some servers issue) comes
    /// back byte for byte, plain and sealed: never altered, never unreadable.
    #[test]
    fn a_header_value_that_is_not_utf8_round_trips() {
        let value = HeaderValue::from_bytes(b"Bearer caf\xe9-\xff").unwrap();
        let credential =
            Credential::from_headers([(HeaderName::from_static("authorization"), value)])
                .unwrap()
                .with_refresh_token("rt");
        for codec in [codec("k", None), codec("k", Some([1; 32]))] {
            let back = codec.decode(&codec.encode(&credential).unwrap()).unwrap();
            assert_eq!(back, credential);
            let (_, value) = back.headers().next().unwrap();
            assert_eq!(value.as_bytes(), b"Bearer caf\xe9-\xff");
        }
    }

    /// What cannot be read is refused, saying why and never what it holds: another
    /// version, garbage, a sealed value under another key or bound to another key name,
    /// plain text where a key is set, a sealed value where none is.
    #[test]
    fn what_cannot_be_read_is_refused() {
        let credential = credential();
        let plain = codec("k", None);
        let sealed = codec("k", Some([1; 32]));
        let other_key = codec("k", Some([2; 32]));
        let other_name = codec("other", Some([1; 32]));
        let sealed_value = sealed.encode(&credential).unwrap();
        let plain_value = plain.encode(&credential).unwrap();
        for (codec, value) in [
            (&plain, "v2:ab:{}".to_owned()),
            (&plain, "v1:ab:{not json".to_owned()),
            (
                &plain,
                "v1:ab:{\"h\":[[\"authorization\",\"Bearer \\n x\"]]}".to_owned(),
            ),
            (&plain, sealed_value.clone()),
            (&sealed, plain_value.clone()),
            // An expiry that is not whole milliseconds, or out of any clock's range: never
            // read as "does not expire", never a panic.
            (
                &plain,
                "v1:ab:{\"h\":[[\"authorization\",\"Bearer x\"]],\"exp\":1.8e12}".to_owned(),
            ),
            (
                &plain,
                "v1:ab:{\"h\":[[\"authorization\",\"Bearer x\"]],\"exp\":\"soon\"}".to_owned(),
            ),
            (
                &plain,
                format!(
                    "v1:ab:{{\"h\":[[\"authorization\",\"Bearer x\"]],\"iat\":{}}}",
                    u64::MAX
                ),
            ),
            (&other_key, sealed_value.clone()),
            (&other_name, sealed_value.clone()),
            (
                &sealed,
                format!("{}x", &sealed_value[..sealed_value.len() - 2]),
            ),
        ] {
            let why = codec.decode(&value).unwrap_err();
            assert!(!why.contains("s3cr3t") && !why.contains("Bearer"), "{why}");
        }
    }
}
