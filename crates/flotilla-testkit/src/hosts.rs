//! Hosts of a multi-host test, on one machine: each host is a network namespace with its own
//! address and, optionally, its own Docker engine (a second `dockerd` running inside the
//! namespace, with its own data root, socket and containers).
//!
//! ```text
//!   root namespace: 10.213.Y.1 on bridge flb<tag>   (the test, and services it runs here)
//!        |-- veth flv<tag>h0 -- namespace flotilla-<tag>-h0: eth0 10.213.Y.11, dockerd
//!        |-- veth flv<tag>h1 -- namespace flotilla-<tag>-h1: eth0 10.213.Y.12, dockerd
//!        ...
//! ```
//!
//! `<tag>` is the test process's pid (hex), `g`, and a counter, so names are unique per
//! [`Hosts`] and short enough for interface names (15 characters). The subnet `10.213.Y.0/24`
//! is the first one no interface of the machine uses, picked under a lock file, so tests running
//! at the same time each get their own. Everything is removed on drop, and whatever a dead test
//! process left behind (its pid is gone) is removed by the next [`Hosts::new`].
//!
//! Processes run in a host through `nsenter --net` ([`Host::command`]): unlike
//! `ip netns exec`, it keeps the mount namespace, whose `/sys/fs/cgroup` dockerd needs (with
//! cgroup v1, `ip netns exec` remounts `/sys` and dockerd fails: "Devices cgroup isn't
//! mounted"). A partition ([`Host::partition`]) drops every packet in and out of the host's
//! `eth0` with iptables rules inside its namespace; processes on the host still reach each
//! other over its own address.

use std::{
    ffi::OsStr,
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::Process;

/// Where engines keep their data roots: on disk (fuse-overlayfs), not on a tmpfs.
const BASE_DIR: &str = "/var/tmp/flotilla-test-hosts";
/// Every test's subnet is `10.213.Y.0/24`.
const SUBNET: [u8; 2] = [10, 213];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The tools the hosts need, found once.
#[derive(Debug, Clone)]
struct Tools {
    ip: PathBuf,
    iptables: PathBuf,
    nsenter: PathBuf,
    docker: PathBuf,
    dockerd: PathBuf,
}

impl Tools {
    fn find() -> anyhow::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            .unwrap_or("");
        anyhow::ensure!(
            uid == "0",
            "the multi-host tests create network namespaces, bridges, iptables rules and \
             Docker engines: run them as root (uid {uid})"
        );
        let tools = Self {
            ip: tool("ip", "apt-get install iproute2")?,
            iptables: tool("iptables", "apt-get install iptables")?,
            nsenter: tool("nsenter", "apt-get install util-linux")?,
            docker: tool(
                "docker",
                "install Docker Engine (apt-get install docker.io)",
            )?,
            dockerd: tool(
                "dockerd",
                "install Docker Engine (apt-get install docker.io)",
            )?,
        };
        tool("fuse-overlayfs", "apt-get install fuse-overlayfs")?;
        anyhow::ensure!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the hosts' Docker engines use fuse-overlayfs, which needs \
             the fuse device (modprobe fuse, or run the container with --device /dev/fuse)"
        );
        Ok(tools)
    }

    fn docker_on(&self, socket: &Path) -> Command {
        let mut command = Command::new(&self.docker);
        command
            .arg("-H")
            .arg(format!("unix://{}", socket.display()));
        command
    }

    fn in_netns(&self, netns: &str, program: &OsStr) -> Command {
        let mut command = Command::new(&self.nsenter);
        command
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(program);
        command
    }
}

/// `name` on PATH or in the sbin directories (not always on a test's PATH).
fn tool(name: &str, install: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!("{name} not found: the multi-host tests need it ({install})")
        })
}

/// Runs `command`; its stdout, or an error with its stderr.
fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {command:?}: {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `command` for its effect during cleanup, where a failure is not an error (the
/// thing may be gone already).
fn run_quietly(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn netns_name(tag: &str, index: usize) -> String {
    format!("flotilla-{tag}-h{index}")
}

fn bridge_name(tag: &str) -> String {
    format!("flb{tag}")
}

fn veth_name(tag: &str, index: usize) -> String {
    format!("flv{tag}h{index}")
}

fn peer_name(tag: &str, index: usize) -> String {
    format!("flp{tag}h{index}")
}

/// The pid a tag was made from (`<pid hex>g<counter>`).
fn tag_pid(tag: &str) -> Option<u32> {
    let (pid, counter) = tag.split_once('g')?;
    counter.parse::<usize>().ok()?;
    u32::from_str_radix(pid, 16).ok()
}

/// A tag whose test process is gone: everything named after it is a leftover.
fn is_stale(tag: &str) -> bool {
    tag_pid(tag).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Hosts of one test, on a bridge of their own. See the module documentation.
pub struct Hosts {
    tools: Tools,
    tag: String,
    bridge: String,
    /// The first three octets of the subnet.
    subnet: [u8; 3],
    dir: PathBuf,
    image: String,
    hosts: Vec<Host>,
}

/// One host: a network namespace with its address, and its Docker engine if it has one.
pub struct Host {
    tools: Tools,
    index: usize,
    netns: String,
    addr: Ipv4Addr,
    dir: PathBuf,
    engine: Option<Engine>,
    partitioned: bool,
}

struct Engine {
    process: Process,
    socket: PathBuf,
}

/// How a process is started inside a host's network namespace.
#[derive(Debug, Clone)]
pub(crate) struct Launcher {
    tools: Tools,
    netns: String,
}

impl Launcher {
    pub(crate) fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.tools.in_netns(&self.netns, program.as_ref())
    }
}

impl Hosts {
    /// The bridge and the subnet, without hosts yet ([`Self::add`]).
    pub fn new() -> anyhow::Result<Self> {
        let tools = Tools::find()?;
        std::fs::create_dir_all(BASE_DIR)?;
        // One test at a time picks a subnet and sweeps leftovers.
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(BASE_DIR).join(".lock"))?;
        lock.lock()?;
        sweep_stale(&tools);

        let tag = format!(
            "{:x}g{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        anyhow::ensure!(tag.len() <= 10, "tag {tag} too long for interface names");
        let subnet = free_subnet(&tools)?;
        let dir = Path::new(BASE_DIR).join(&tag);
        std::fs::create_dir_all(&dir)?;
        let hosts = Self {
            bridge: bridge_name(&tag),
            tools,
            tag,
            subnet,
            dir,
            image: std::env::var("FLOTILLA_WORKER_IMAGE")
                .unwrap_or_else(|_| "flotilla-worker:latest".to_owned()),
            hosts: Vec::new(),
        };
        // From here on, drop removes whatever was made.
        let ip = &hosts.tools.ip;
        let bridge = &hosts.bridge;
        run(Command::new(ip).args(["link", "add", bridge, "type", "bridge"]))?;
        run(Command::new(ip).args([
            "addr",
            "add",
            &format!("{}/24", hosts.root_addr()),
            "dev",
            bridge,
        ]))?;
        run(Command::new(ip).args(["link", "set", bridge, "up"]))?;
        drop(lock);
        // Docker sets the FORWARD policy to DROP, and with br_netfilter bridged frames go
        // through it: let this bridge's own traffic pass.
        run(Command::new(&hosts.tools.iptables).args(forward_rule("-I", bridge)))?;
        Ok(hosts)
    }

    /// `count` hosts, each with its own Docker engine holding the worker image.
    pub async fn start(count: usize) -> anyhow::Result<Self> {
        let mut hosts = Self::new()?;
        let first = hosts.hosts.len();
        for _ in 0..count {
            hosts.add_namespace()?;
        }
        // The engines start side by side: a second or two each.
        let engines = futures::future::try_join_all(
            hosts.hosts[first..]
                .iter()
                .map(|host| Engine::start(&hosts.tools, &host.netns, &host.dir, &hosts.image)),
        )
        .await?;
        for (host, engine) in hosts.hosts[first..].iter_mut().zip(engines) {
            host.engine = Some(engine);
        }
        Ok(hosts)
    }

    /// Adds a host, with its own Docker engine if `engine`; returns its index.
    pub async fn add(&mut self, engine: bool) -> anyhow::Result<usize> {
        let index = self.add_namespace()?;
        if engine {
            let host = &self.hosts[index];
            let engine = Engine::start(&self.tools, &host.netns, &host.dir, &self.image).await?;
            self.hosts[index].engine = Some(engine);
        }
        Ok(index)
    }

    fn add_namespace(&mut self) -> anyhow::Result<usize> {
        let index = self.hosts.len();
        anyhow::ensure!(index < 100, "at most 100 hosts");
        let addr = self.host_addr(index);
        let dir = self.dir.join(format!("h{index}"));
        std::fs::create_dir_all(&dir)?;
        let netns = netns_name(&self.tag, index);
        self.hosts.push(Host {
            tools: self.tools.clone(),
            index,
            netns: netns.clone(),
            addr,
            dir,
            engine: None,
            partitioned: false,
        });
        let ip = &self.tools.ip;
        let veth = veth_name(&self.tag, index);
        let peer = peer_name(&self.tag, index);
        run(Command::new(ip).args(["netns", "add", &netns]))?;
        run(Command::new(ip).args(["link", "add", &veth, "type", "veth", "peer", "name", &peer]))?;
        run(Command::new(ip).args(["link", "set", &peer, "netns", &netns]))?;
        run(Command::new(ip).args(["link", "set", &veth, "master", &self.bridge, "up"]))?;
        run(Command::new(ip).args(["-n", &netns, "link", "set", &peer, "name", "eth0"]))?;
        run(Command::new(ip).args([
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]))?;
        run(Command::new(ip).args(["-n", &netns, "link", "set", "eth0", "up"]))?;
        run(Command::new(ip).args(["-n", &netns, "link", "set", "lo", "up"]))?;
        Ok(index)
    }

    /// The root namespace's address on the bridge: processes of the test itself (services it
    /// runs outside the hosts) are reached there from the hosts.
    pub fn root_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    fn host_addr(&self, index: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 11 + index as u8)
    }

    /// What this test's namespaces, interfaces, rules and directories are named after.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Host> {
        self.hosts.iter()
    }

    /// What is still left on the machine of the hosts tagged `tag` (namespaces, interfaces,
    /// iptables rules, engine directories, processes in their namespaces): empty once their
    /// [`Hosts`] has been dropped.
    pub fn leftovers(tag: &str) -> Vec<String> {
        let Ok(tools) = Tools::find() else {
            return vec!["the tools the hosts need are missing".to_owned()];
        };
        let mut left = Vec::new();
        for netns in netns_list(&tools) {
            if netns.starts_with(&format!("flotilla-{tag}-")) {
                left.push(format!("network namespace {netns}"));
            }
        }
        for link in link_list(&tools) {
            if link_tag(&link).is_some_and(|t| t == tag) {
                left.push(format!("interface {link}"));
            }
        }
        let bridge = bridge_name(tag);
        if let Ok(rules) = run(Command::new(&tools.iptables).args(["-w", "-S", "FORWARD"])) {
            for rule in rules.lines() {
                if rule.split_whitespace().any(|word| word == bridge) {
                    left.push(format!("iptables rule {rule}"));
                }
            }
        }
        let dir = Path::new(BASE_DIR).join(tag);
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
        left
    }
}

impl std::ops::Index<usize> for Hosts {
    type Output = Host;

    fn index(&self, index: usize) -> &Host {
        &self.hosts[index]
    }
}

impl std::ops::IndexMut<usize> for Hosts {
    fn index_mut(&mut self, index: usize) -> &mut Host {
        &mut self.hosts[index]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            host.shut_down();
        }
        teardown_tag(&self.tools, &self.tag);
    }
}

impl Host {
    pub fn index(&self) -> usize {
        self.index
    }

    /// The host's address (its `eth0`), reachable from the root namespace and the other hosts.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The name of its network namespace (`ip netns list`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `program` to be run inside the host (`nsenter --net=/run/netns/<ns> -- program`): the
    /// process sees only the host's interfaces. Add arguments and environment as usual.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.tools.in_netns(&self.netns, program.as_ref())
    }

    pub(crate) fn launcher(&self) -> Launcher {
        Launcher {
            tools: self.tools.clone(),
            netns: self.netns.clone(),
        }
    }

    /// `DOCKER_HOST` for the host's engine (`unix://<socket>`), if it has one.
    pub fn docker_host(&self) -> Option<String> {
        self.engine
            .as_ref()
            .map(|engine| format!("unix://{}", engine.socket.display()))
    }

    /// Runs the docker CLI against the host's engine; its stdout.
    pub fn docker<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let engine = self.engine()?;
        run(self.tools.docker_on(&engine.socket).args(args))
    }

    /// Ids of every container (running or not) in the host's engine.
    pub fn containers(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .docker(["ps", "-aq"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// `<id> <name>` of the containers that ran or run a job: all but the warm ones waiting in
    /// a pool (`flotilla-warm-*`).
    pub fn job_containers(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .docker(["ps", "-a", "--format", "{{.ID}} {{.Names}}|{{.Status}}"])?
            .lines()
            // dockerd on fuse-overlayfs may keep listing a removed container ("Removal In
            // Progress", no name, `docker rm` says it does not exist): removed.
            .filter(|line| !line.ends_with("|Removal In Progress"))
            .filter_map(|line| line.split_once('|').map(|(container, _)| container))
            .filter(|line| {
                !line
                    .split_once(' ')
                    .is_some_and(|(_, name)| name.starts_with("flotilla-warm-"))
            })
            .map(str::to_owned)
            .collect())
    }

    /// What the host's dockerd logged.
    pub fn engine_log(&self) -> String {
        self.engine
            .as_ref()
            .map(|engine| engine.process.log())
            .unwrap_or_default()
    }

    /// Cuts the host off: every packet in or out of its `eth0` is dropped (connections hang,
    /// as across a real partition). Processes on the host still reach each other.
    pub fn partition(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.partitioned, "host {} is already cut off", self.index);
        for rule in partition_rules() {
            let mut command = self.command(&self.tools.iptables);
            command.arg("-w").arg("-I").args(rule);
            run(&mut command)?;
        }
        self.partitioned = true;
        Ok(())
    }

    /// Ends [`Self::partition`].
    pub fn heal(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.partitioned, "host {} is not cut off", self.index);
        for rule in partition_rules() {
            let mut command = self.command(&self.tools.iptables);
            command.arg("-w").arg("-D").args(rule);
            run(&mut command)?;
        }
        self.partitioned = false;
        Ok(())
    }

    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }

    fn engine(&self) -> anyhow::Result<&Engine> {
        self.engine
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("host {} has no Docker engine", self.index))
    }

    /// Stops everything in the host: its processes (but the engine's), then its containers,
    /// then the engine, then whatever is left.
    fn shut_down(&mut self) {
        kill_netns_processes(&self.tools, &self.netns, true);
        if let Some(mut engine) = self.engine.take() {
            remove_all_containers(&self.tools, &engine.socket);
            engine.process.terminate_and_wait(Duration::from_secs(15));
        }
        kill_netns_processes(&self.tools, &self.netns, false);
    }
}

impl Engine {
    async fn start(tools: &Tools, netns: &str, dir: &Path, image: &str) -> anyhow::Result<Self> {
        let socket = dir.join("docker.sock");
        let mut command = tools.in_netns(netns, tools.dockerd.as_os_str());
        command.args(dockerd_args(dir));
        let process = Process::spawn_command(
            &format!("dockerd in {netns}"),
            command,
            &dir.join("dockerd.log"),
        )?;
        let mut engine = Self { process, socket };
        engine.wait_ready(tools, Duration::from_secs(60)).await?;
        engine.load(tools, image).await?;
        Ok(engine)
    }

    async fn wait_ready(&mut self, tools: &Tools, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.process.try_exit_code() {
                anyhow::bail!(
                    "{} exited ({code:?}) before answering:\n{}",
                    self.process.name(),
                    self.process.log()
                );
            }
            let answered = tokio::process::Command::new(&tools.docker)
                .arg("-H")
                .arg(format!("unix://{}", self.socket.display()))
                .arg("info")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|status| status.success());
            if answered {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not answer within {timeout:?}:\n{}",
                self.process.name(),
                self.process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `docker save <image> | docker -H <engine> load`: the worker image, from the machine's
    /// own engine (scripts/build-image builds it there).
    async fn load(&self, tools: &Tools, image: &str) -> anyhow::Result<()> {
        let present = tokio::process::Command::new(&tools.docker)
            .args(["image", "inspect", "--format", "{{.Id}}", image])
            .output()
            .await?;
        anyhow::ensure!(
            present.status.success(),
            "the worker image {image} is missing from the machine's Docker engine: build it \
             with scripts/build-image (scripts/test does)"
        );
        let mut save = tokio::process::Command::new(&tools.docker)
            .args(["save", image])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout: Stdio = save
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("docker save has no stdout"))?
            .try_into()?;
        let load = tokio::process::Command::new(&tools.docker)
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("load")
            .stdin(stdout)
            .output()
            .await?;
        let saved = save.wait_with_output().await?;
        anyhow::ensure!(
            saved.status.success() && load.status.success(),
            "cannot load {image} into {}: {}{}",
            self.process.name(),
            String::from_utf8_lossy(&saved.stderr),
            String::from_utf8_lossy(&load.stderr)
        );
        let loaded = tokio::process::Command::new(&tools.docker)
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["image", "inspect", "--format", "{{.Id}}", image])
            .output()
            .await?;
        anyhow::ensure!(
            loaded.stdout == present.stdout,
            "{image} in {} is not the machine's ({} vs {})",
            self.process.name(),
            String::from_utf8_lossy(&loaded.stdout).trim(),
            String::from_utf8_lossy(&present.stdout).trim()
        );
        Ok(())
    }
}

fn dockerd_args(dir: &Path) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    // The machine's /etc/docker/daemon.json names its own data root: an empty one instead.
    let config = dir.join("daemon.json");
    if !config.exists() {
        let _ = std::fs::write(&config, "{}\n");
    }
    vec![
        format!("--data-root={}", path("data")),
        format!("--exec-root={}", path("exec")),
        format!("--host=unix://{}", path("docker.sock")),
        format!("--pidfile={}", path("docker.pid")),
        format!("--config-file={}", config.display()),
        // Job containers have no network: no bridge, no firewall rules of the engine's own.
        "--bridge=none".to_owned(),
        "--iptables=false".to_owned(),
        "--ip6tables=false".to_owned(),
        "--storage-driver=fuse-overlayfs".to_owned(),
    ]
}

fn forward_rule<'a>(action: &'a str, bridge: &'a str) -> [&'a str; 9] {
    [
        "-w", action, "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT",
    ]
}

fn partition_rules() -> [[&'static str; 5]; 2] {
    [
        ["INPUT", "-i", "eth0", "-j", "DROP"],
        ["OUTPUT", "-o", "eth0", "-j", "DROP"],
    ]
}

/// The first `10.213.Y` no interface of the machine has an address in.
fn free_subnet(tools: &Tools) -> anyhow::Result<[u8; 3]> {
    let addresses = run(Command::new(&tools.ip).args(["-o", "-4", "addr", "show"]))?;
    let [a, b] = SUBNET;
    (1..=254u8)
        .find(|y| {
            let prefix = format!(" {a}.{b}.{y}.");
            !addresses.contains(&prefix)
        })
        .map(|y| [a, b, y])
        .ok_or_else(|| anyhow::anyhow!("every 10.213.Y.0/24 subnet is in use"))
}

fn netns_list(tools: &Tools) -> Vec<String> {
    run(Command::new(&tools.ip).args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn link_list(tools: &Tools) -> Vec<String> {
    run(Command::new(&tools.ip).args(["-o", "link", "show"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// The tag of one of our interfaces (`flb<tag>`, `flv<tag>h<i>`, `flp<tag>h<i>`).
fn link_tag(name: &str) -> Option<&str> {
    if let Some(tag) = name.strip_prefix("flb") {
        return tag_pid(tag).map(|_| tag);
    }
    let rest = name
        .strip_prefix("flv")
        .or_else(|| name.strip_prefix("flp"))?;
    let (tag, index) = rest.rsplit_once('h')?;
    index.parse::<usize>().ok()?;
    tag_pid(tag).map(|_| tag)
}

/// Pids of the processes in a network namespace; with `but_engines`, not dockerd, containerd
/// and their shims (their containers are removed through the engine first).
fn netns_pids(tools: &Tools, netns: &str, but_engines: bool) -> Vec<String> {
    run(Command::new(&tools.ip).args(["netns", "pids", netns]))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|pid| !pid.is_empty())
        .filter(|pid| {
            if !but_engines {
                return true;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            !(comm == "dockerd" || comm.starts_with("containerd") || comm == "runc")
        })
        .map(str::to_owned)
        .collect()
}

fn kill_netns_processes(tools: &Tools, netns: &str, but_engines: bool) {
    let pids = netns_pids(tools, netns, but_engines);
    if pids.is_empty() {
        return;
    }
    run_quietly(Command::new("kill").arg("-KILL").args(&pids));
    // Gone (or zombies of the test process, reaped when their `Process` drops) shortly after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let alive = pids.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        });
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_all_containers(tools: &Tools, socket: &Path) {
    let Ok(ids) = run(tools.docker_on(socket).args(["ps", "-aq"])) else {
        return;
    };
    let ids: Vec<&str> = ids.lines().collect();
    if !ids.is_empty() {
        run_quietly(tools.docker_on(socket).args(["rm", "-f", "-v"]).args(&ids));
    }
}

/// Removes the namespaces, interfaces, rule and directory of `tag`.
fn teardown_tag(tools: &Tools, tag: &str) {
    for netns in netns_list(tools) {
        if netns.starts_with(&format!("flotilla-{tag}-")) {
            kill_netns_processes(tools, &netns, false);
            run_quietly(Command::new(&tools.ip).args(["netns", "del", &netns]));
        }
    }
    for link in link_list(tools) {
        if link_tag(&link) == Some(tag) {
            run_quietly(Command::new(&tools.ip).args(["link", "del", &link]));
        }
    }
    let bridge = bridge_name(tag);
    for _ in 0..10 {
        if !run_quietly(Command::new(&tools.iptables).args(forward_rule("-D", &bridge))) {
            break;
        }
    }
    remove_dir(&Path::new(BASE_DIR).join(tag));
}

/// Unmounts whatever an engine left mounted under `dir` (deepest first), then deletes it.
fn remove_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let prefix = format!("{}/", dir.display());
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|point| point.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    mounts.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in mounts {
        run_quietly(Command::new("umount").arg("-l").arg(point));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes what dead test processes left: engines still running or holding containers, their
/// namespaces, interfaces, rules and directories.
fn sweep_stale(tools: &Tools) {
    let mut tags: Vec<String> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(BASE_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                tags.push(name);
            }
        }
    }
    for netns in netns_list(tools) {
        if let Some(tag) = netns
            .strip_prefix("flotilla-")
            .and_then(|rest| rest.rsplit_once('-'))
            .map(|(tag, _)| tag.to_owned())
            && is_stale(&tag)
        {
            tags.push(tag);
        }
    }
    for link in link_list(tools) {
        if let Some(tag) = link_tag(&link)
            && is_stale(tag)
        {
            tags.push(tag.to_owned());
        }
    }
    tags.sort();
    tags.dedup();
    for tag in tags {
        if let Ok(hosts) = std::fs::read_dir(Path::new(BASE_DIR).join(&tag)) {
            for host in hosts.flatten() {
                sweep_engine(tools, &host.path());
            }
        }
        teardown_tag(tools, &tag);
    }
}

/// Removes the containers of a dead test's engine: through its dockerd if it still runs,
/// else through a dockerd started on its data root for the purpose.
fn sweep_engine(tools: &Tools, dir: &Path) {
    let socket = dir.join("docker.sock");
    let answers = || run_quietly(tools.docker_on(&socket).arg("info"));
    let containers = dir.join("data/containers");
    let has_containers = std::fs::read_dir(&containers).is_ok_and(|mut d| d.next().is_some());
    let mut temporary = None;
    if !answers() {
        if !has_containers {
            return;
        }
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(dir.join("docker.pid"));
        let mut command = Command::new(&tools.dockerd);
        command.args(dockerd_args(dir));
        let Ok(process) =
            Process::spawn_command("dockerd (sweep)", command, &dir.join("dockerd-sweep.log"))
        else {
            return;
        };
        temporary = Some(process);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !answers() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    remove_all_containers(tools, &socket);
    match temporary {
        Some(mut process) => {
            process.terminate_and_wait(Duration::from_secs(15));
        }
        None => {
            if let Ok(pid) = std::fs::read_to_string(dir.join("docker.pid")) {
                run_quietly(Command::new("kill").arg("-TERM").arg(pid.trim()));
                let deadline = Instant::now() + Duration::from_secs(15);
                while answers() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interfaces_and_parse_back() {
        let tag = format!("{:x}g{}", 4_194_304u32, 99);
        assert!(veth_name(&tag, 99).len() <= 15, "{}", veth_name(&tag, 99));
        assert_eq!(tag_pid(&tag), Some(4_194_304));
        assert_eq!(link_tag(&bridge_name(&tag)), Some(tag.as_str()));
        assert_eq!(link_tag(&veth_name(&tag, 3)), Some(tag.as_str()));
        assert_eq!(link_tag(&peer_name(&tag, 12)), Some(tag.as_str()));
        assert_eq!(link_tag("flannel.1"), None);
        assert_eq!(link_tag("eth0"), None);
    }
}
