//! Dispatch-latency and intake benchmark, run by hand (see docs/performance.md) and, with
//! `--short`, by `scripts/test`, which prints its figures without asserting any:
//!
//!     cargo build --workspace --bins --release && target/release/flotilla-bench [--short]
//!
//! In one run it measures the raw Docker baselines ((a) `docker exec` of `echo` into a running
//! container, (b) a whole container run), Flotilla's warm (c) and cold (d) paths one job at a
//! time, (e) the warm path's stages from the services' spans, (f) sustained jobs/s on one node
//! against raw parallel container churn, with the node's CPU per job, and (g) intake without
//! nodes: `POST /jobs` one at a time, under load, and direct NATS submissions admitted.

mod breakdown;
mod intake;
mod path;
mod raw;
mod stats;

use std::time::Duration;

use bollard::Docker;
use flotilla_testkit::{Fleet, OtlpReceiver};

use stats::{Baseline, median, percentile, report};

/// How much each section does: the full run, or `--short` for CI.
struct Plan {
    samples: usize,
    churn_jobs: usize,
    raw_churn_each: usize,
    intake_posts: usize,
    load: Duration,
    direct: usize,
}

impl Plan {
    fn from_args() -> anyhow::Result<Self> {
        match std::env::args().nth(1).as_deref() {
            None => Ok(Self {
                samples: 40,
                churn_jobs: 200,
                raw_churn_each: 25,
                intake_posts: 500,
                load: Duration::from_secs(5),
                direct: 20_000,
            }),
            Some("--short") => Ok(Self {
                samples: 10,
                churn_jobs: 40,
                raw_churn_each: 5,
                intake_posts: 100,
                load: Duration::from_secs(2),
                direct: 2_000,
            }),
            Some(other) => {
                anyhow::bail!("unknown argument {other}; usage: flotilla-bench [--short]")
            }
        }
    }
}

/// Sequential jobs come this far apart: 5 a second, the rate the warm pool must keep up with.
const GAP: Duration = Duration::from_millis(200);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let plan = Plan::from_args()?;
    let docker = Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;
    println!(
        "flotilla-bench: {} samples per latency figure\n",
        plan.samples
    );

    let exec = raw::exec(&docker, plan.samples).await?;
    report("(a) raw docker exec echo", &exec, None);
    let run = raw::run(&docker, plan.samples).await?;
    report("(b) raw create+start+wait+remove echo", &run, None);
    let attach = raw::attach_echo(&docker, plan.samples, "echo \"$line\"").await?;
    report(
        "    raw attach: stdin line → echoed on stdout",
        &attach,
        None,
    );
    let attach = raw::attach_echo(&docker, plan.samples, "/bin/sh -c \"echo $line\"").await?;
    report(
        "    raw attach: stdin line → /bin/sh -c echo on stdout",
        &attach,
        None,
    );
    // What the job script does before an `echo` job's first byte (dd of the script, sh, mkdir,
    // sh of the shell engine's job file): the container's own part of the first byte.
    let shape = "echo x | dd bs=65536 count=2 iflag=count_bytes,fullblock of=/tmp/j 2>/dev/null; \
        /bin/sh -c 'mkdir -p /tmp/w/.f; printf \"%s\" \"echo hi\" > /tmp/w/.f/job.sh; \
        /bin/sh /tmp/w/.f/job.sh </dev/null & c=$!; wait $c'";
    let attach = raw::attach_echo(&docker, plan.samples, shape).await?;
    report(
        "    raw attach: stdin line → a job script's shape, echo",
        &attach,
        None,
    );
    let base = Baseline {
        exec_ms: median(&exec),
        run_ms: median(&run),
    };

    let warm = one_at_a_time(&plan, "(c) warm", 4, base).await?;
    one_at_a_time(&plan, "(d) cold", 0, base).await?;
    breakdown(&plan).await?;
    let churn = sustained(&plan, &docker).await?;
    let intake = intake(&plan).await?;

    println!("\ngoals (issue 16):");
    println!(
        "  POST sent → /wait returned: median {:.2}× exec (goal ≤ 0.25×), p99 {:.2}× (goal ≤ 0.5×)",
        median(&warm.done) / base.exec_ms,
        percentile(&warm.done, 0.99) / base.exec_ms
    );
    println!(
        "  POST returned → first line: median {:.2} ms (goal ≤ 3 ms)",
        median(&warm.first_line)
    );
    println!("  sustained churn: {churn:.2}× raw (goal ≥ 1.5×)");
    println!(
        "  POST /jobs one at a time: median {:.2} ms (goal ≤ 1 ms); loaded {:.0}/s, p99 {:.2} ms \
         (goal ≥ 10,000/s, p99 < 10 ms); direct {:.0}/s (goal ≥ 20,000/s)",
        intake.single_median, intake.loaded_per_s, intake.loaded_p99, intake.direct_per_s
    );
    Ok(())
}

struct Path {
    done: Vec<f64>,
    first_line: Vec<f64>,
}

/// (c)/(d): jobs one at a time, 5 a second, on one node with a warm pool of `pool`.
async fn one_at_a_time(
    plan: &Plan,
    label: &str,
    pool: u64,
    base: Baseline,
) -> anyhow::Result<Path> {
    let fleet = Fleet::builder()
        .nodes(1)
        .slots(1)
        .env("FLOTILLA_POOL_SIZE", &pool.to_string())
        .start()
        .await?;
    path::wait_for_pool(&fleet, pool).await?;
    let samples = path::sequential(&fleet, plan.samples, GAP).await?;
    let start: Vec<f64> = samples.iter().filter_map(|s| s.start_ms).collect();
    let first_line: Vec<f64> = samples.iter().map(|s| s.first_line_ms).collect();
    let done: Vec<f64> = samples.iter().map(|s| s.done_ms).collect();
    println!();
    report(
        &format!("{label}: node receipt → process running"),
        &start,
        Some(base),
    );
    report(
        &format!("    {label}: POST returned → first line at subscriber"),
        &first_line,
        Some(base),
    );
    report(
        &format!("    {label}: POST sent → /wait returned"),
        &done,
        Some(base),
    );
    println!(
        "    {label}: pool hits/misses on the node: {}",
        path::pool_use(&fleet).await?
    );
    Ok(Path { done, first_line })
}

/// (e): the warm path's stages, from the spans of a fleet exporting traces.
async fn breakdown(plan: &Plan) -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let fleet = Fleet::builder()
        .nodes(1)
        .slots(1)
        .env("FLOTILLA_POOL_SIZE", "4")
        .otlp(&receiver.url)
        .start()
        .await?;
    path::wait_for_pool(&fleet, 4).await?;
    let samples = path::sequential(&fleet, plan.samples, GAP).await?;
    let stages = breakdown::stages(&receiver, &samples).await?;
    println!(
        "\n(e) warm path by stage (traces exported; {} jobs):",
        stages[0].len()
    );
    let mut total = 0.0;
    for (name, figures) in breakdown::STAGES.iter().zip(&stages) {
        total += median(figures);
        report(&format!("    {name}"), figures, None);
    }
    println!("    sum of the stage medians: {total:.2} ms");
    Ok(())
}

/// (f): sustained jobs/s on one node with 4 slots, against raw containers 4 in parallel.
async fn sustained(plan: &Plan, docker: &Docker) -> anyhow::Result<f64> {
    let fleet = Fleet::builder()
        .nodes(1)
        .slots(4)
        .env("FLOTILLA_POOL_SIZE", "4")
        .start()
        .await?;
    path::wait_for_pool(&fleet, 4).await?;
    let (jobs_per_s, cpu) = path::throughput(&fleet, plan.churn_jobs).await?;
    drop(fleet);
    let raw_per_s = raw::churn(docker, 4, plan.raw_churn_each).await?;
    println!(
        "\n(f) {} trivial jobs, one node, 4 slots, warm pool 4: {jobs_per_s:.1} jobs/s, node CPU {:.2} ms per job",
        plan.churn_jobs,
        stats::ms(cpu)
    );
    println!(
        "    raw create+start+wait+remove, 4 in parallel: {raw_per_s:.1} containers/s (ratio {:.2})",
        jobs_per_s / raw_per_s
    );
    Ok(jobs_per_s / raw_per_s)
}

struct Intake {
    single_median: f64,
    loaded_per_s: f64,
    loaded_p99: f64,
    direct_per_s: f64,
}

/// (g): intake on fleets without nodes.
async fn intake(plan: &Plan) -> anyhow::Result<Intake> {
    let fleet = Fleet::builder().nodes(0).start().await?;
    let single = intake::one_at_a_time(&fleet, plan.intake_posts).await?;
    println!();
    report("(g) POST /jobs one at a time, no nodes", &single, None);
    let load = intake::loaded(&fleet, 16, plan.load).await?;
    report(
        &format!(
            "    16 clients for {} s: {:.0} POST/s ({} refused)",
            plan.load.as_secs(),
            load.per_s,
            load.refused
        ),
        &load.latencies,
        None,
    );
    drop(fleet);
    // A fresh fleet for each load: the run queue holds at most 100,000 jobs.
    let fleet = Fleet::builder().nodes(0).start().await?;
    match intake::wrk(&fleet, plan.load)? {
        Some(figures) => println!("    wrk -t2 -c16 for {} s:\n{figures}", plan.load.as_secs()),
        None => println!("    (wrk not installed: no wrk figure)"),
    }
    drop(fleet);
    let fleet = Fleet::builder().nodes(0).start().await?;
    let direct = intake::direct(&fleet, plan.direct).await?;
    println!(
        "    {} direct NATS submissions admitted: {direct:.0}/s",
        plan.direct
    );
    Ok(Intake {
        single_median: median(&single),
        loaded_per_s: load.per_s,
        loaded_p99: percentile(&load.latencies, 0.99),
        direct_per_s: direct,
    })
}
