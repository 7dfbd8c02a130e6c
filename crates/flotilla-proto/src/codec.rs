//! Encoding: MessagePack with named fields (maps, so fields can be added), or JSON when the
//! publisher says so with `Content-Type: application/json`.

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::names::CONTENT_TYPE_JSON;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    MessagePack,
    Json,
}

impl Encoding {
    /// The encoding a message declares through its `Content-Type` header value.
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(value) if value.trim().starts_with(CONTENT_TYPE_JSON) => Self::Json,
            _ => Self::MessagePack,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("invalid messagepack: {0}")]
    MessagePack(#[from] rmp_serde::decode::Error),
    #[error("invalid json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// Encodes as MessagePack with named fields.
pub fn encode<T: Serialize>(value: &T) -> Result<Bytes, CodecError> {
    Ok(Bytes::from(rmp_serde::to_vec_named(value)?))
}

pub fn decode<T: DeserializeOwned>(payload: &[u8], encoding: Encoding) -> Result<T, CodecError> {
    Ok(match encoding {
        Encoding::MessagePack => rmp_serde::from_slice(payload)?,
        Encoding::Json => serde_json::from_slice(payload)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobStatus, LogChunk, LogEnd, LogStream, SubmitRequest};

    #[test]
    fn msgpack_uses_field_names() {
        let chunk = LogChunk {
            job_id: "a-1".into(),
            attempt: 1,
            seq: 7,
            stream: LogStream::Stderr,
            data: b"hello".to_vec(),
            end: Some(LogEnd {
                status: JobStatus::Failed,
                exit_code: Some(3),
                error: None,
            }),
        };
        let bytes = encode(&chunk).unwrap();
        // A map with string keys, not a positional array.
        assert!(bytes.windows(6).any(|w| w == b"job_id"));
        let back: LogChunk = decode(&bytes, Encoding::MessagePack).unwrap();
        assert_eq!(back, chunk);
    }

    #[test]
    fn json_and_msgpack_submissions_agree() {
        let json = br#"{"agent_id":"a","engine":"shell","prompt":"echo hi","prompt_vars":{"n":3}}"#;
        let from_json: SubmitRequest = decode(json, Encoding::Json).unwrap();
        let packed = encode(&from_json).unwrap();
        let from_msgpack: SubmitRequest = decode(&packed, Encoding::MessagePack).unwrap();
        assert_eq!(from_json, from_msgpack);
    }

    #[test]
    fn content_type_selects_json() {
        assert_eq!(
            Encoding::from_content_type(Some("application/json")),
            Encoding::Json
        );
        assert_eq!(
            Encoding::from_content_type(Some("application/json; charset=utf-8")),
            Encoding::Json
        );
        assert_eq!(Encoding::from_content_type(None), Encoding::MessagePack);
    }
}
