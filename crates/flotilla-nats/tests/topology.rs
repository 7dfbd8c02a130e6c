//! The JetStream topology against a real nats-server.

use async_nats::jetstream;
use flotilla_nats::{Topology, TopologyConfig};
use flotilla_proto::names;
use flotilla_testkit::NatsServer;

#[tokio::test]
async fn stored_submissions_are_never_given_up_while_job_messages_are() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    Topology::ensure(client.clone(), TopologyConfig::default())
        .await
        .unwrap();
    let js = jetstream::new(client);
    let max_deliver = |stream: &'static str, consumer: &'static str| {
        let js = js.clone();
        async move {
            let mut consumer: jetstream::consumer::PullConsumer = js
                .get_stream(stream)
                .await
                .unwrap()
                .get_consumer(consumer)
                .await
                .unwrap();
            consumer.info().await.unwrap().config.max_deliver
        }
    };
    // Admission only fails on NATS trouble: retried until it works.
    assert_eq!(
        max_deliver(names::STREAM_SUBMIT, names::CONSUMER_INTAKE).await,
        -1
    );
    // A job that keeps failing its nodes is dead-lettered after a few deliveries.
    assert_eq!(
        max_deliver(names::STREAM_JOBS, names::CONSUMER_AGENTS).await,
        TopologyConfig::default().max_deliver
    );
}
