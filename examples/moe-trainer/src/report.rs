//! What a finished comparison leaves behind: the JSON file with every
//! figure and the PNG (loss curves and per-layer domain × expert heatmaps).
//!
//! May import: the crate's local, plot and stats modules.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::data::DOMAINS;
use crate::local::RunResult;
use crate::plot::{Curve, Heatmap, LinePanel};

/// Writes `moe-trainer.json` (and `moe-trainer.png` unless `plot` is
/// false) into `dir`; returns their paths.
pub fn write(
    dir: &Path,
    runs: &[RunResult],
    config: serde_json::Value,
    plot: bool,
) -> Result<(PathBuf, Option<PathBuf>), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let json_path = dir.join("moe-trainer.json");
    let doc = json!({
        "config": config,
        "domains": DOMAINS,
        "runs": runs.iter().map(RunResult::to_json).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(&json_path, text)
        .map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    if !plot {
        return Ok((json_path, None));
    }
    let png = dir.join("moe-trainer.png");
    let panels = vec![
        LinePanel {
            title: "train loss (reporting peer)".into(),
            x_label: "inner step".into(),
            y_label: "cross-entropy".into(),
            curves: runs
                .iter()
                .map(|r| Curve {
                    label: format!("{} LBL", r.lbl),
                    points: smooth(
                        &r.steps
                            .iter()
                            .map(|s| (s.step as f64, s.loss))
                            .collect::<Vec<_>>(),
                        5,
                    ),
                })
                .collect(),
        },
        LinePanel {
            title: "validation loss per domain".into(),
            x_label: "outer step".into(),
            y_label: "cross-entropy".into(),
            curves: runs
                .iter()
                .flat_map(|r| {
                    DOMAINS.iter().enumerate().map(move |(d, name)| Curve {
                        label: format!("{} {name}", r.lbl),
                        points: r
                            .outer
                            .iter()
                            .filter_map(|o| o.val.get(d).map(|&v| (o.outer_step as f64, v)))
                            .collect(),
                    })
                })
                .collect(),
        },
    ];
    let mut heatmaps = Vec::new();
    for r in runs {
        let mi = r.mutual_information();
        for (l, counts) in r.spec.iter().enumerate() {
            let experts = counts.first().map_or(0, Vec::len);
            heatmaps.push(Heatmap {
                title: format!(
                    "{} LBL, layer {l}: MI {:.3} bits",
                    r.lbl,
                    mi.get(l).copied().unwrap_or(0.0)
                ),
                row_labels: DOMAINS.iter().map(|d| d.to_string()).collect(),
                col_labels: (0..experts).map(|e| format!("e{e}")).collect(),
                values: crate::stats::frequencies(counts),
            });
        }
    }
    crate::plot::render_png(
        &png,
        "MoE trainer: load balancing over a churning swarm",
        &panels,
        &heatmaps,
    )?;
    Ok((json_path, Some(png)))
}

/// Moving average over `window` points (the reporting peer's loss is noisy).
fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let lo = i.saturating_sub(w - 1);
            let slice = &points[lo..=i];
            (
                x,
                slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64,
            )
        })
        .filter(|p| p.1.is_finite())
        .collect()
}
