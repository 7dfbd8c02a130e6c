//! The JetStream topology against a real nats-server.

use async_nats::jetstream;
use flotilla_nats::{Topology, TopologyConfig, TopologyError};
use flotilla_proto::{JobClass, JobRequest, Priority, names};
use flotilla_testkit::NatsServer;

#[tokio::test]
async fn stored_submissions_are_never_given_up_while_job_messages_are() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let topology = Topology::ensure(client.clone(), TopologyConfig::default())
        .await
        .unwrap();
    let class = JobClass::of(&JobRequest::example("job-1", "shell", "true"));
    let class = topology.queues.ensure(&class).await.unwrap();
    let js = jetstream::new(client);
    let max_deliver = |stream: &'static str, consumer: String| {
        let js = js.clone();
        async move {
            let mut consumer: jetstream::consumer::PullConsumer = js
                .get_stream(stream)
                .await
                .unwrap()
                .get_consumer(&consumer)
                .await
                .unwrap();
            consumer.info().await.unwrap().config.max_deliver
        }
    };
    // Admission only fails on NATS trouble: retried until it works.
    assert_eq!(
        max_deliver(names::STREAM_SUBMIT, names::CONSUMER_INTAKE.to_owned()).await,
        -1
    );
    // A job that keeps failing its nodes is dead-lettered after a few deliveries.
    assert_eq!(
        max_deliver(
            names::STREAM_JOBS,
            names::run_consumer(Priority::Normal, &class)
        )
        .await,
        TopologyConfig::default().max_deliver
    );
}

/// Every stream and bucket has a byte limit and a message size limit, so that nothing a client
/// sends can fill the server's disk; a message over the limit is refused.
#[tokio::test]
async fn every_stream_and_bucket_is_bounded_in_bytes() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let config = TopologyConfig {
        max_message_bytes: 64 << 10,
        ..TopologyConfig::default()
    };
    Topology::ensure(client.clone(), config.clone())
        .await
        .unwrap();
    let js = jetstream::new(client);
    let mut streams = js.stream_names();
    let mut seen = 0;
    while let Some(name) = futures::StreamExt::next(&mut streams).await {
        let name = name.unwrap();
        let mut stream = js.get_stream(&name).await.unwrap();
        let info = stream.info().await.unwrap().config.clone();
        assert!(info.max_bytes > 0, "{name} has no byte limit");
        assert_eq!(info.max_message_size, 64 << 10, "{name}");
        seen += 1;
    }
    assert_eq!(
        seen, 15,
        "six streams, eight buckets and the artifacts object store"
    );
    let too_big = vec![b'x'; 65 << 10];
    let refused = match js.publish(names::SUBJECT_SUBMIT, too_big.into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a message over the limit was stored");
}

/// A service whose settings differ from what the fleet created refuses to start, saying what
/// differs and how to change it; told to update, it changes the objects to its settings.
#[tokio::test]
async fn differing_settings_are_refused_at_startup_or_updated_when_asked() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    Topology::ensure(client.clone(), TopologyConfig::default())
        .await
        .unwrap();
    let other = TopologyConfig {
        bucket_max_bytes: 512 << 20,
        ack_wait: std::time::Duration::from_secs(7),
        ..TopologyConfig::default()
    };
    let Err(refusal) = Topology::ensure(client.clone(), other.clone()).await else {
        panic!("a service with other limits started");
    };
    let message = refusal.to_string();
    assert!(matches!(refusal, TopologyError::Drift { .. }), "{message}");
    assert!(
        message.contains("FLOTILLA_TOPOLOGY_UPDATE=true"),
        "{message}"
    );
    assert!(message.contains("nats "), "the manual command: {message}");

    let updated = TopologyConfig {
        update: true,
        ..other.clone()
    };
    Topology::ensure(client.clone(), updated).await.unwrap();
    // Now the objects hold the new settings: the same service starts without updating.
    Topology::ensure(client.clone(), other).await.unwrap();
    let js = jetstream::new(client);
    let mut bucket = js.get_stream("KV_flotilla_jobs").await.unwrap();
    assert_eq!(bucket.info().await.unwrap().config.max_bytes, 512 << 20);
}
