//! Webhooks: the dispatcher POSTs a finished job's record to its `webhook_url`, signed, and
//! retries a receiver that failed.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use flotilla_testkit::{Fleet, wait_until};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::{get_job, submit, wait};

const SECRET: &str = "webhook-test-secret";

type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A receiver that fails its first request with 500 and accepts the rest.
async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let seen = received.clone();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push((headers, body));
                if seen.len() == 1 {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test]
async fn a_finished_job_is_posted_to_its_webhook_signed_and_retried() {
    let (url, received) = receiver().await;
    let fleet = Fleet::builder()
        // The receiver is on loopback, which webhooks may not target outside tests.
        .env("FLOTILLA_ALLOW_PRIVATE_WEBHOOKS", "true")
        .dispatcher_env("FLOTILLA_WEBHOOK_SECRET", SECRET)
        .start()
        .await
        .unwrap();
    let job_id = submit(
        &fleet,
        json!({"agent_id": "hooked", "engine": "shell", "prompt": "echo webhook", "webhook_url": url}),
    )
    .await;
    assert_eq!(wait(&fleet, &job_id).await["status"], "completed");

    // The first attempt gets a 500; the retry (2 s later) is accepted and recorded.
    let job = wait_until(Duration::from_secs(20), "the webhook delivered", || async {
        let (_, job) = get_job(&fleet, &job_id).await;
        job["webhook"]["delivered_at"].is_string().then_some(job)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert_eq!(job["webhook"]["attempts"], 2, "{job:#}");
    assert_eq!(job["webhook"]["status_code"], 204);
    assert_eq!(job["webhook_url"], url.as_str());

    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    for (i, (headers, body)) in received.iter().enumerate() {
        let header = |name: &str| headers[name].to_str().unwrap().to_owned();
        assert_eq!(header("flotilla-event"), "job.completed");
        assert_eq!(header("flotilla-delivery"), format!("{job_id}.{}", i + 1));
        assert_eq!(header("idempotency-key"), job_id);
        assert_eq!(header("content-type"), "application/json");
        // t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
        let signature = header("flotilla-signature");
        let (t, v1) = signature.split_once(",v1=").unwrap();
        let t = t.strip_prefix("t=").unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        assert_eq!(v1, hex::encode(mac.finalize().into_bytes()));
        let record: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(record["job_id"], job_id.as_str());
        assert_eq!(record["status"], "completed");
        assert_eq!(record["result"]["text"], "webhook\n");
        assert_eq!(record["logs"], "webhook\n", "Parpaing's field");
    }
}
