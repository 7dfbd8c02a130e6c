use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::{net::TcpListener, sync::watch};

/// A TCP proxy on loopback that can cut every connection through it and refuse new ones, to
/// take one process off the network without touching the others.
pub struct TcpProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    cut_signal: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream_port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let (cut_signal, _) = watch::channel(0u64);
        let accepting_cut = cut.clone();
        let signal = cut_signal.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if accepting_cut.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let mut cut_now = signal.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_now.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            cut,
            cut_signal,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every connection and refuses new ones until [`TcpProxy::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cut_signal.send_modify(|n| *n += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
