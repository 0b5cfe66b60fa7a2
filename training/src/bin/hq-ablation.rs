//! `hq-ablation`: the ablation table (Markdown, mean and spread over seeds) and chart (PNG) from
//! built-in evaluation reports. Used by `tools/ablation.sh`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use hq_train::ablation::{chart, json, markdown, read_report, AblationRun};

#[derive(Parser, Debug)]
#[command(
    name = "hq-ablation",
    version,
    about = "Put built-in evaluation reports of ablation variants side by side: a Markdown table \
             (mean, sample standard deviation and range over seeds, change of the mean against \
             the first variant) and a PNG bar chart"
)]
struct Cli {
    /// Reports as VARIANT=SEED=REPORT.json (`hq-eval builtin --out`, or a run's eval/step-N.json);
    /// the first variant is the reference of the Δ column.
    #[arg(required = true, value_name = "VARIANT=SEED=FILE")]
    reports: Vec<String>,
    /// Write the table here (it is printed either way).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write the chart here.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// Write the figures as JSON here (per variant and metric: mean, spread and every seed's
    /// value, as fractions; plus the embedding diagnostics).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut runs = Vec::new();
    for r in &cli.reports {
        let mut parts = r.splitn(3, '=');
        let (Some(variant), Some(seed), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("{r:?} is not VARIANT=SEED=FILE");
        };
        runs.push(AblationRun {
            variant: variant.to_string(),
            seed: seed.to_string(),
            report: read_report(&PathBuf::from(path))?,
        });
    }
    let md = markdown(&runs)?;
    print!("{md}");
    if let Some(out) = &cli.out {
        hq_data::atomic::write_atomic(out, md.as_bytes())?;
        eprintln!("hq-ablation: wrote {}", out.display());
    }
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&json(&runs)?)? + "\n";
        hq_data::atomic::write_atomic(path, text.as_bytes())?;
        eprintln!("hq-ablation: wrote {}", path.display());
    }
    if let Some(png) = &cli.png {
        chart(&runs, png)?;
        eprintln!("hq-ablation: wrote {}", png.display());
    }
    Ok(())
}
