//! Per-job llm-gateway grants in KV, keyed by the hash of the job's token (see
//! `flotilla_proto::llm`). Nodes issue and revoke them; the llm-gateway looks them up.

use async_nats::jetstream::kv::{Operation, Store};
use chrono::Utc;
use flotilla_proto::{Encoding, LlmGrant, llm};

use crate::StoreError;

#[derive(Clone)]
pub struct GrantStore {
    kv: Store,
}

impl GrantStore {
    pub fn new(kv: Store) -> Self {
        Self { kv }
    }

    /// Stores `grant` under a fresh token and returns the token: the only copy, for the job.
    pub async fn issue(&self, grant: &LlmGrant) -> Result<String, StoreError> {
        let token = llm::new_token();
        let value = flotilla_proto::encode(grant)?;
        self.kv
            .put(llm::grant_key(&token), value)
            .await
            .map_err(StoreError::nats)?;
        Ok(token)
    }

    pub async fn lookup(&self, token: &str) -> Result<Option<LlmGrant>, StoreError> {
        let entry = self
            .kv
            .entry(llm::grant_key(token))
            .await
            .map_err(StoreError::nats)?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => Ok(Some(flotilla_proto::decode(
                &entry.value,
                Encoding::MessagePack,
            )?)),
            _ => Ok(None),
        }
    }

    /// Marks the token's grant revoked (kept, so the gateway can say why it refuses it).
    pub async fn revoke(&self, token: &str) -> Result<(), StoreError> {
        let Some(mut grant) = self.lookup(token).await? else {
            return Ok(());
        };
        if grant.revoked_at.is_none() {
            grant.revoked_at = Some(Utc::now());
            let value = flotilla_proto::encode(&grant)?;
            self.kv
                .put(llm::grant_key(token), value)
                .await
                .map_err(StoreError::nats)?;
        }
        Ok(())
    }
}
