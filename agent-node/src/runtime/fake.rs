//! An in-process [`ContainerRuntime`] whose containers follow a script instead of running one:
//! how long they take, what they write, how they exit (a code, an OOM kill, a hang), whether
//! they honour SIGTERM. Calls can be made to fail. For the node's unit tests and for
//! simulations of many nodes without Docker.
//!
//! Time is tokio's, so tests on a paused clock (`start_paused`) run timeouts and stop grace
//! periods instantly. A container's behaviour is chosen when its job script arrives, by the
//! function given to [`FakeRuntime::set_script`] (or one fixed [`Behaviour`]).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt as _, channel::mpsc as output_channel, future::BoxFuture};
use tokio::{
    io::AsyncReadExt as _,
    sync::{mpsc, watch},
};

use super::{
    ContainerRuntime, ContainerSpec, Exit, Listed, OutputStream, Owner, Prepared, RuntimeError,
    Selector,
};

const RUNTIME: &str = "fake";
/// Exit code of a process killed by SIGKILL (the kernel's OOM killer, or a stop's grace over).
pub const SIGKILL_EXIT: i64 = 137;
/// Exit code of a shell that got SIGTERM.
pub const SIGTERM_EXIT: i64 = 143;

/// What a container does once its job script has arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Behaviour {
    /// Written in this order, spread evenly over `duration`.
    pub output: Vec<(OutputStream, Bytes)>,
    /// From the script's arrival to the exit.
    pub duration: Duration,
    pub exit_code: i64,
    /// At the end of `duration` the kernel kills it at its memory limit (137, `oom_killed`).
    pub oom: bool,
    /// After its output it never exits on its own.
    pub hang: bool,
    /// It ignores SIGTERM, so a stop takes the whole grace period and ends in SIGKILL (137).
    pub ignore_term: bool,
}

impl Behaviour {
    /// Exits at once with `code`.
    pub fn exit(code: i64) -> Self {
        Self {
            exit_code: code,
            ..Self::default()
        }
    }

    /// Writes its output, then never exits on its own.
    pub fn hang() -> Self {
        Self {
            hang: true,
            ..Self::default()
        }
    }

    /// Killed by the OOM killer at the end of its duration.
    pub fn oom() -> Self {
        Self {
            oom: true,
            ..Self::default()
        }
    }

    #[must_use]
    pub fn stdout(mut self, bytes: impl Into<Bytes>) -> Self {
        self.output.push((OutputStream::Stdout, bytes.into()));
        self
    }

    #[must_use]
    pub fn stderr(mut self, bytes: impl Into<Bytes>) -> Self {
        self.output.push((OutputStream::Stderr, bytes.into()));
        self
    }

    #[must_use]
    pub fn lasting(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    #[must_use]
    pub fn ignoring_term(mut self) -> Self {
        self.ignore_term = true;
        self
    }
}

/// A runtime call that [`FakeRuntime::fail`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Prepare,
    /// The container dies before its script arrives: writing stdin fails.
    Launch,
    Wait,
    Stop,
    List,
    ImageExists,
    FindBinaries,
    JobNetwork,
    CheckJobNetwork,
}

/// What happened, in order, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Prepared {
        id: String,
        name: String,
    },
    Launched {
        id: String,
    },
    Renamed {
        id: String,
        name: String,
    },
    Stopped {
        id: String,
        grace: Duration,
    },
    Exited {
        id: String,
        exit: Exit,
    },
    Removed {
        id: String,
    },
    /// The job network's fence was checked.
    NetworkChecked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started, waiting for its script on stdin.
    Waiting,
    Running,
    Exited(Exit),
}

/// A container as the fake sees it.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub spec: ContainerSpec,
    pub owner: Owner,
    /// Unix seconds.
    pub created: i64,
    pub phase: Phase,
    /// The job script, once it arrived.
    pub script: Option<Vec<u8>>,
}

type Script = Arc<dyn Fn(&[u8]) -> Behaviour + Send + Sync>;

#[derive(Debug, Clone, Copy)]
enum Signal {
    Term(Duration),
    Kill,
}

struct Entry {
    container: Container,
    signals: mpsc::UnboundedSender<Signal>,
    exit: watch::Receiver<Option<Exit>>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    containers: HashMap<String, Entry>,
    events: Vec<Event>,
    faults: HashMap<Op, usize>,
    missing_images: HashSet<String>,
    /// `None`: every binary is present.
    binaries: Option<HashSet<String>>,
    /// Why the job network's fence is broken, when it is.
    broken_fence: Option<String>,
    /// How long preparing a container takes (a real one: 150-300 ms).
    prepare_delay: Duration,
}

struct Inner {
    state: Mutex<State>,
    script: Mutex<Script>,
}

/// The scripted runtime. Clones share their containers.
#[derive(Clone)]
pub struct FakeRuntime {
    inner: Arc<Inner>,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        Self::new(Behaviour::default())
    }
}

impl FakeRuntime {
    /// Every container behaves as `behaviour`.
    pub fn new(behaviour: Behaviour) -> Self {
        let fake = Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                script: Mutex::new(Arc::new(|_: &[u8]| Behaviour::default())),
            }),
        };
        fake.set_behaviour(behaviour);
        fake
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.set_script(move |_| behaviour.clone());
    }

    /// Chooses each container's behaviour from its job script.
    pub fn set_script(&self, script: impl Fn(&[u8]) -> Behaviour + Send + Sync + 'static) {
        *self.inner.script.lock().expect("fake script") = Arc::new(script);
    }

    /// The next `times` calls of `op` fail.
    pub fn fail(&self, op: Op, times: usize) {
        self.state().faults.insert(op, times);
    }

    /// Preparing a container takes `delay` from now on.
    pub fn set_prepare_delay(&self, delay: Duration) {
        self.state().prepare_delay = delay;
    }

    pub fn set_missing_image(&self, image: &str) {
        self.state().missing_images.insert(image.to_owned());
    }

    /// Only these binaries are in the image (by default, every one is).
    pub fn set_binaries<I: IntoIterator<Item = S>, S: Into<String>>(&self, binaries: I) {
        self.state().binaries = Some(binaries.into_iter().map(Into::into).collect());
    }

    /// Breaks the job network's fence (`Some(why)`) or mends it (`None`), as an operator's
    /// firewall reload or `docker network rm` would.
    pub fn set_broken_fence(&self, why: Option<&str>) {
        self.state().broken_fence = why.map(str::to_owned);
    }

    pub fn events(&self) -> Vec<Event> {
        self.state().events.clone()
    }

    /// Containers not removed yet, oldest first.
    pub fn containers(&self) -> Vec<Container> {
        let state = self.state();
        let mut all: Vec<Container> = state
            .containers
            .values()
            .map(|e| e.container.clone())
            .collect();
        all.sort_by_key(|c| id_number(&c.id));
        all
    }

    pub fn container(&self, id: &str) -> Option<Container> {
        self.state().containers.get(id).map(|e| e.container.clone())
    }

    /// Makes a container look `seconds` older (for the reapers' minimum age).
    pub fn backdate(&self, id: &str, seconds: i64) {
        if let Some(entry) = self.state().containers.get_mut(id) {
            entry.container.created -= seconds;
        }
    }

    /// Kills a container as a crash would (137, no OOM) and waits until it has exited.
    pub async fn kill(&self, id: &str) {
        let exit = {
            let state = self.state();
            let Some(entry) = state.containers.get(id) else {
                return;
            };
            let _ = entry.signals.send(Signal::Kill);
            entry.exit.clone()
        };
        wait_exit(exit).await;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("fake state")
    }

    /// Whether `op` fails this time (and counts the fault down).
    fn faulted(&self, op: Op) -> Result<(), RuntimeError> {
        let mut state = self.state();
        match state.faults.get_mut(&op) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(RuntimeError::api(
                    RUNTIME,
                    format!("injected failure: {op:?}"),
                ))
            }
            _ => Ok(()),
        }
    }

    fn create(&self, spec: &ContainerSpec, name: &str, owner: &Owner) -> Prepared {
        let dead_on_arrival = self.faulted(Op::Launch).is_err();
        let (stdin, reader) = tokio::io::duplex(64 * 1024);
        let (output, output_rx) = output_channel::unbounded();
        let (signals, signals_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit) = watch::channel(None);
        let id = {
            let mut state = self.state();
            state.next_id += 1;
            let id = format!("fake-{}", state.next_id);
            let container = Container {
                id: id.clone(),
                name: name.to_owned(),
                spec: spec.clone(),
                owner: owner.clone(),
                created: chrono::Utc::now().timestamp(),
                phase: Phase::Waiting,
                script: None,
            };
            state.events.push(Event::Prepared {
                id: id.clone(),
                name: name.to_owned(),
            });
            let entry = Entry {
                container,
                signals,
                exit,
            };
            state.containers.insert(id.clone(), entry);
            id
        };
        let process = Process {
            fake: self.clone(),
            id: id.clone(),
            output,
            signals: signals_rx,
            exit: exit_tx,
        };
        if dead_on_arrival {
            // Its stdin is closed before anything can be written to it.
            drop(reader);
            process.exited(Exit {
                code: 127,
                oom_killed: false,
            });
        } else {
            tokio::spawn(process.run(reader));
        }
        Prepared::new(RUNTIME, id, Box::pin(output_rx), Box::pin(stdin))
    }

    fn exit_of(&self, id: &str) -> Result<watch::Receiver<Option<Exit>>, RuntimeError> {
        self.state()
            .containers
            .get(id)
            .map(|e| e.exit.clone())
            .ok_or_else(|| RuntimeError::api(RUNTIME, format!("no such container: {id}")))
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.faulted(Op::Stop)?;
        let exit = {
            let mut state = self.state();
            state.events.push(Event::Stopped {
                id: id.to_owned(),
                grace,
            });
            // Gone counts as stopped, as with Docker.
            let Some(entry) = state.containers.get(id) else {
                return Ok(());
            };
            let _ = entry.signals.send(Signal::Term(grace));
            entry.exit.clone()
        };
        wait_exit(exit).await;
        Ok(())
    }

    fn remove_container(&self, id: &str) {
        let mut state = self.state();
        if let Some(entry) = state.containers.remove(id) {
            let _ = entry.signals.send(Signal::Kill);
            state.events.push(Event::Removed { id: id.to_owned() });
        }
    }

    fn list_containers(&self, selector: Selector<'_>) -> Result<Vec<Listed>, RuntimeError> {
        self.faulted(Op::List)?;
        Ok(self
            .containers()
            .into_iter()
            .filter(|c| match selector {
                Selector::Cluster(cluster) => c.owner.cluster == cluster,
                Selector::Node(node) => c.owner.node_id == node,
            })
            .map(|c| Listed {
                id: c.id,
                node_id: c.owner.node_id,
                created: c.created,
            })
            .collect())
    }

    fn present_binaries(&self, binaries: &[String]) -> Result<HashSet<String>, RuntimeError> {
        self.faulted(Op::FindBinaries)?;
        let state = self.state();
        Ok(binaries
            .iter()
            .filter(|b| state.binaries.as_ref().is_none_or(|set| set.contains(*b)))
            .cloned()
            .collect())
    }
}

async fn wait_exit(mut exit: watch::Receiver<Option<Exit>>) -> Option<Exit> {
    exit.wait_for(Option::is_some).await.ok().and_then(|e| *e)
}

fn exit_with(code: i64) -> Exit {
    Exit {
        code,
        oom_killed: false,
    }
}

fn id_number(id: &str) -> u64 {
    id.trim_start_matches("fake-").parse().unwrap_or(0)
}

/// The "process" of one container: a task that reads its script, plays its behaviour and
/// answers signals.
struct Process {
    fake: FakeRuntime,
    id: String,
    output: output_channel::UnboundedSender<Result<(OutputStream, Bytes), RuntimeError>>,
    signals: mpsc::UnboundedReceiver<Signal>,
    exit: watch::Sender<Option<Exit>>,
}

/// The job script out of what the launcher reads: its length on the first line (then `tar`
/// when a workspace tar follows the script, which the fake does not unpack), then the script.
fn job_script(stdin: Vec<u8>) -> Vec<u8> {
    let Some(newline) = stdin.iter().position(|&b| b == b'\n') else {
        return stdin;
    };
    let Some(len) = std::str::from_utf8(&stdin[..newline])
        .ok()
        .and_then(|header| header.split(' ').next()?.parse::<usize>().ok())
    else {
        return stdin;
    };
    let start = newline + 1;
    stdin[start..(start + len).min(stdin.len())].to_vec()
}

impl Process {
    async fn run(mut self, mut stdin: tokio::io::DuplexStream) {
        let mut script = Vec::new();
        let read = tokio::select! {
            read = stdin.read_to_end(&mut script) => Ok(read),
            signal = self.signals.recv() => Err(signal),
        };
        // Closed before the exit is reported: a dead container takes no more input.
        drop(stdin);
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return self.exited(exit_with(1)),
            // The launcher is a plain shell: SIGTERM ends it.
            Err(Some(Signal::Term(_))) => return self.exited(exit_with(SIGTERM_EXIT)),
            Err(Some(Signal::Kill) | None) => return self.exited(exit_with(SIGKILL_EXIT)),
        }
        let script = job_script(script);
        let choose = self.fake.inner.script.lock().expect("fake script").clone();
        let behaviour = choose(&script);
        self.started(script);
        let exit = self.play(&behaviour).await;
        self.exited(exit);
    }

    fn started(&self, script: Vec<u8>) {
        let mut state = self.fake.state();
        if let Some(entry) = state.containers.get_mut(&self.id) {
            entry.container.phase = Phase::Running;
            entry.container.script = Some(script);
        }
        state.events.push(Event::Launched {
            id: self.id.clone(),
        });
    }

    /// Writes the output over the duration, then exits as scripted, unless a signal comes
    /// first.
    async fn play(&mut self, behaviour: &Behaviour) -> Exit {
        let mut output: VecDeque<_> = behaviour.output.iter().cloned().collect();
        let steps = u32::try_from(output.len() + 1).unwrap_or(u32::MAX);
        let step = behaviour.duration / steps;
        loop {
            if output.is_empty() && behaviour.hang {
                let signal = self.signals.recv().await;
                return self.signalled(signal, behaviour).await;
            }
            tokio::select! {
                () = tokio::time::sleep(step) => {}
                signal = self.signals.recv() => return self.signalled(signal, behaviour).await,
            }
            match output.pop_front() {
                Some(item) => {
                    let _ = self.output.unbounded_send(Ok(item));
                }
                None => {
                    return Exit {
                        code: if behaviour.oom {
                            SIGKILL_EXIT
                        } else {
                            behaviour.exit_code
                        },
                        oom_killed: behaviour.oom,
                    };
                }
            }
        }
    }

    /// How the process ends on `signal` (`None`: the container was removed).
    async fn signalled(&mut self, signal: Option<Signal>, behaviour: &Behaviour) -> Exit {
        let killed = Exit {
            code: SIGKILL_EXIT,
            oom_killed: false,
        };
        match signal {
            Some(Signal::Term(grace)) if behaviour.ignore_term => {
                // SIGKILL once the grace period is over, unless killed sooner.
                tokio::select! {
                    () = tokio::time::sleep(grace) => killed,
                    _ = self.signals.recv() => killed,
                }
            }
            Some(Signal::Term(_)) => Exit {
                code: SIGTERM_EXIT,
                oom_killed: false,
            },
            Some(Signal::Kill) | None => killed,
        }
    }

    fn exited(self, exit: Exit) {
        let mut state = self.fake.state();
        if let Some(entry) = state.containers.get_mut(&self.id) {
            entry.container.phase = Phase::Exited(exit);
        }
        state.events.push(Event::Exited {
            id: self.id.clone(),
            exit,
        });
        drop(state);
        // Dropping the output sender ends the container's output stream.
        let _ = self.exit.send(Some(exit));
    }
}

impl ContainerRuntime for FakeRuntime {
    fn prepare<'a>(
        &'a self,
        spec: &'a ContainerSpec,
        name: &'a str,
        owner: &'a Owner,
    ) -> BoxFuture<'a, Result<Prepared, RuntimeError>> {
        let delay = self.state().prepare_delay;
        async move {
            tokio::time::sleep(delay).await;
            self.faulted(Op::Prepare)
                .map(|()| self.create(spec, name, owner))
        }
        .boxed()
    }

    fn rename<'a>(&'a self, id: &'a str, name: &'a str) -> BoxFuture<'a, ()> {
        let mut state = self.state();
        if let Some(entry) = state.containers.get_mut(id) {
            name.clone_into(&mut entry.container.name);
            state.events.push(Event::Renamed {
                id: id.to_owned(),
                name: name.to_owned(),
            });
        }
        futures::future::ready(()).boxed()
    }

    fn is_running<'a>(&'a self, id: &'a str) -> BoxFuture<'a, bool> {
        let running = self
            .container(id)
            .is_some_and(|c| matches!(c.phase, Phase::Waiting | Phase::Running));
        futures::future::ready(running).boxed()
    }

    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Exit, RuntimeError>> {
        Box::pin(async move {
            self.faulted(Op::Wait)?;
            let exit = self.exit_of(id)?;
            wait_exit(exit)
                .await
                .ok_or_else(|| RuntimeError::api(RUNTIME, "container wait ended without a status"))
        })
    }

    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.stop_container(id, grace))
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        self.remove_container(id);
        futures::future::ready(()).boxed()
    }

    fn list<'a>(
        &'a self,
        selector: Selector<'a>,
    ) -> BoxFuture<'a, Result<Vec<Listed>, RuntimeError>> {
        futures::future::ready(self.list_containers(selector)).boxed()
    }

    fn image_exists<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<bool, RuntimeError>> {
        let exists = self
            .faulted(Op::ImageExists)
            .map(|()| !self.state().missing_images.contains(image));
        futures::future::ready(exists).boxed()
    }

    fn pull_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.state().missing_images.remove(image);
        futures::future::ready(Ok(())).boxed()
    }

    fn runtimes(&self) -> BoxFuture<'_, Result<Vec<String>, RuntimeError>> {
        futures::future::ready(Ok(vec!["runc".to_owned()])).boxed()
    }

    fn find_binaries<'a>(
        &'a self,
        _spec: &'a ContainerSpec,
        _name: &'a str,
        _owner: &'a Owner,
        binaries: &'a [String],
    ) -> BoxFuture<'a, Result<HashSet<String>, RuntimeError>> {
        futures::future::ready(self.present_binaries(binaries)).boxed()
    }

    fn job_network<'a>(
        &'a self,
        _network: &'a str,
        _cluster: &'a str,
        gateway_port: u16,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        let url = self
            .faulted(Op::JobNetwork)
            .map(|()| format!("http://fake-llm-gateway:{gateway_port}"));
        futures::future::ready(url).boxed()
    }

    fn check_job_network<'a>(
        &'a self,
        _network: &'a str,
        gateway_port: u16,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        let checked = self.faulted(Op::CheckJobNetwork).and_then(|()| {
            let mut state = self.state();
            state.events.push(Event::NetworkChecked);
            match &state.broken_fence {
                Some(why) => Err(RuntimeError::Network(why.clone().into())),
                None => Ok(format!("http://fake-llm-gateway:{gateway_port}")),
            }
        });
        futures::future::ready(checked).boxed()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;
    use crate::runtime::{Network, Role};

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "img".to_owned(),
            memory_bytes: 1 << 30,
            nano_cpus: 1_000_000_000,
            pids_limit: 64,
            workspace_bytes: 1 << 20,
            network: Network::None,
            runtime_class: None,
        }
    }

    fn owner(node: &str) -> Owner {
        Owner {
            node_id: node.to_owned(),
            cluster: "c".to_owned(),
            role: Role::Cold,
            job: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn plays_its_script() {
        let fake = FakeRuntime::new(Behaviour::exit(0));
        fake.set_script(|script| {
            if script == b"fail" {
                Behaviour::exit(2)
                    .stderr("bad")
                    .lasting(Duration::from_secs(3))
            } else {
                Behaviour::exit(0).stdout("ok")
            }
        });
        let prepared = fake.prepare(&spec(), "c1", &owner("n")).await.unwrap();
        let started = prepared.launch(b"fail").await.unwrap();
        let before = tokio::time::Instant::now();
        let output: Vec<_> = started.output.map(Result::unwrap).collect().await;
        assert_eq!(output, vec![(OutputStream::Stderr, Bytes::from("bad"))]);
        let exit = fake.wait(&started.id).await.unwrap();
        assert_eq!(exit.code, 2);
        assert_eq!(before.elapsed(), Duration::from_secs(3));
        let container = fake.container(&started.id).unwrap();
        assert_eq!(container.script.as_deref(), Some(&b"fail"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn lists_removes_and_fails_on_request() {
        let fake = FakeRuntime::default();
        let a = fake.prepare(&spec(), "a", &owner("n1")).await.unwrap();
        let _b = fake.prepare(&spec(), "b", &owner("n2")).await.unwrap();
        let node = fake.list(Selector::Node("n1")).await.unwrap();
        assert_eq!(node.len(), 1);
        assert_eq!(fake.list(Selector::Cluster("c")).await.unwrap().len(), 2);
        fake.remove(&a.id).await;
        assert!(!fake.is_running(&a.id).await);
        assert_eq!(fake.list(Selector::Cluster("c")).await.unwrap().len(), 1);
        fake.fail(Op::Prepare, 1);
        assert!(fake.prepare(&spec(), "c", &owner("n1")).await.is_err());
        assert!(fake.prepare(&spec(), "c", &owner("n1")).await.is_ok());
        fake.fail(Op::Launch, 1);
        let dead = fake.prepare(&spec(), "d", &owner("n1")).await.unwrap();
        assert!(dead.launch(b"exit 0").await.is_err());
    }
}
