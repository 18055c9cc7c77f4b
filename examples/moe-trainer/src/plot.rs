//! One PNG figure with loss curves and expert-specialization heatmaps, drawn without any system
//! fonts: plotters draws the lines and rectangles, and all text is rasterized here from the
//! `font8x8` 8x8 bitmap glyphs (integer scale factors), so no plotters text API is ever called.
//!
//! Layout (top to bottom): the title, the line panels (up to three per row, each with numeric
//! ticks, axis labels and a legend below it), then the heatmaps in a grid (cell colour from the
//! value, the value printed in the cell, row and column labels). The canvas is 1400 px wide; its
//! height follows from the content ([`figure_size`]).

use font8x8::legacy::BASIC_LEGACY;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One line of a [`LinePanel`].
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Clone, Debug, PartialEq)]
pub struct LinePanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub curves: Vec<Curve>,
}

/// A matrix of values in [0, 1] (`values[row][col]`); values outside are clamped for the colour.
#[derive(Clone, Debug, PartialEq)]
pub struct Heatmap {
    pub title: String,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    pub values: Vec<Vec<f64>>,
}

const WIDTH: i32 = 1400;
const MARGIN: i32 = 20;
const GAP: i32 = 28;
const GLYPH: i32 = 8;
const TITLE_SCALE: i32 = 3;
const TEXT_SCALE: i32 = 2;
const PANELS_PER_ROW: usize = 3;
const PLOT_H: i32 = 300;
const LEGEND_ROW_H: i32 = 22;
const LEGEND_SWATCH: i32 = 26;
const CELL_H: i32 = 36;
const MAX_CELL_W: i32 = 120;
const MAX_LABEL_CHARS: usize = 12;

const BACKGROUND: RGBColor = WHITE;
const INK: RGBColor = RGBColor(30, 30, 30);
const MUTED: RGBColor = RGBColor(90, 90, 90);
const GRID: RGBColor = RGBColor(228, 228, 228);
const FRAME: RGBColor = RGBColor(140, 140, 140);
/// Tableau 10: distinct, colour-blind friendly line colours.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

// ---------------------------------------------------------------------------------------------
// text

fn text_width(s: &str, scale: i32) -> i32 {
    s.chars().count() as i32 * GLYPH * scale
}

/// `s` cut to at most `max_px` wide at `scale` (with a trailing `.` when cut).
fn fit(s: &str, scale: i32, max_px: i32) -> String {
    let max_chars = (max_px / (GLYPH * scale)).max(0) as usize;
    if s.chars().count() <= max_chars {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max_chars.saturating_sub(1)).collect();
    if max_chars > 0 {
        out.push('.');
    }
    out
}

fn glyph(c: char) -> [u8; 8] {
    let i = if c.is_ascii() {
        c as usize
    } else {
        '?' as usize
    };
    BASIC_LEGACY[i]
}

/// Draws `s` with its top-left corner at (x, y). Each glyph row is a byte, bit 0 leftmost.
fn draw_text(
    area: &Area,
    x: i32,
    y: i32,
    s: &str,
    scale: i32,
    color: &RGBColor,
) -> Result<(), String> {
    for (i, c) in s.chars().enumerate() {
        let g = glyph(c);
        let gx = x + i as i32 * GLYPH * scale;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..GLYPH {
                if (bits >> col) & 1 == 1 {
                    fill_block(area, gx + col * scale, y + row as i32 * scale, scale, color)?;
                }
            }
        }
    }
    Ok(())
}

/// Draws `s` rotated a quarter turn counter-clockwise (reading bottom to top), with the bottom
/// of the text at `y_bottom` and the glyph tops at column `x`.
fn draw_text_vertical(
    area: &Area,
    x: i32,
    y_bottom: i32,
    s: &str,
    scale: i32,
    color: &RGBColor,
) -> Result<(), String> {
    for (i, c) in s.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..GLYPH {
                if (bits >> col) & 1 == 1 {
                    let along = i as i32 * GLYPH + col;
                    fill_block(
                        area,
                        x + row as i32 * scale,
                        y_bottom - (along + 1) * scale,
                        scale,
                        color,
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn fill_block(area: &Area, x: i32, y: i32, scale: i32, color: &RGBColor) -> Result<(), String> {
    for dy in 0..scale {
        for dx in 0..scale {
            area.draw_pixel((x + dx, y + dy), color).map_err(draw_err)?;
        }
    }
    Ok(())
}

fn draw_err<E: std::fmt::Display>(e: E) -> String {
    format!("drawing failed: {e}")
}

fn fill_rect(area: &Area, r: Rect, color: &RGBColor) -> Result<(), String> {
    area.draw(&Rectangle::new(
        [(r.x, r.y), (r.x + r.w, r.y + r.h)],
        color.filled(),
    ))
    .map_err(draw_err)
}

fn line(area: &Area, pts: Vec<(i32, i32)>, color: &RGBColor, width: u32) -> Result<(), String> {
    area.draw(&PathElement::new(pts, color.stroke_width(width)))
        .map_err(draw_err)
}

// ---------------------------------------------------------------------------------------------
// ticks

/// A linear axis: `[lo, hi]` with ticks every `step` starting at `lo`.
#[derive(Clone, Debug, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    labels: Vec<String>,
}

impl Axis {
    /// An axis covering `[min, max]` with about `target` "nice" (1, 2, 5 × 10^k) intervals.
    fn new(min: f64, max: f64, target: usize) -> Axis {
        let (mut min, mut max) = (min, max);
        if max - min <= f64::EPSILON * min.abs().max(max.abs()).max(1.0) {
            let d = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
            min -= d;
            max += d;
        }
        let raw = (max - min) / target.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        let norm = raw / mag;
        let step = mag
            * if norm < 1.5 {
                1.0
            } else if norm < 3.0 {
                2.0
            } else if norm < 7.0 {
                5.0
            } else {
                10.0
            };
        // small tolerance so that a value on a tick does not add an empty interval
        let lo = (min / step + 1e-9).floor() * step;
        let hi = (max / step - 1e-9).ceil() * step;
        let n = ((hi - lo) / step).round() as usize;
        let big = lo.abs().max(hi.abs()) >= 10_000.0 && step >= 1000.0;
        let decimals = if big {
            ((-(step / 1000.0).log10()).ceil().max(0.0)) as usize
        } else {
            ((-step.log10()).ceil().max(0.0) as usize).min(8)
        };
        let labels = (0..=n)
            .map(|i| {
                let mut v = lo + i as f64 * step;
                if v.abs() < step * 1e-6 {
                    v = 0.0; // no "-0.0"
                }
                if big {
                    format!("{:.*}k", decimals, v / 1000.0)
                } else {
                    format!("{v:.decimals$}")
                }
            })
            .collect::<Vec<String>>();
        // extreme magnitudes or tiny steps: scientific notation keeps the labels short
        let labels = if labels.iter().any(|l| l.len() > 9) {
            (0..=n)
                .map(|i| format!("{:.2e}", lo + i as f64 * step))
                .collect()
        } else {
            labels
        };
        Axis {
            lo,
            hi,
            step,
            labels,
        }
    }

    /// The nicest axis whose labels fit `px` pixels of length (labels are `extent` px each).
    fn fitting(min: f64, max: f64, px: i32, extent: impl Fn(&str) -> i32) -> Axis {
        let mut target = 6;
        loop {
            let axis = Axis::new(min, max, target);
            let widest = axis.labels.iter().map(|l| extent(l)).max().unwrap_or(0);
            let spacing = px / (axis.labels.len().max(2) as i32 - 1);
            if target <= 2 || spacing >= widest + 14 {
                return axis;
            }
            target -= 1;
        }
    }

    fn ticks(&self) -> impl Iterator<Item = (f64, &str)> {
        self.labels
            .iter()
            .enumerate()
            .map(|(i, l)| (self.lo + i as f64 * self.step, l.as_str()))
    }

    /// Position of `v` in `[0, 1]` along the axis.
    fn frac(&self, v: f64) -> f64 {
        (v - self.lo) / (self.hi - self.lo)
    }
}

// ---------------------------------------------------------------------------------------------
// layout

#[derive(Clone, Copy, Debug, PartialEq)]
struct Rect {
    x: i32,
    y: i32,
    w: i32,
    h: i32,
}

struct PanelLayout {
    frame: Rect,
    plot: Rect,
    x_axis: Axis,
    y_axis: Axis,
    /// Legend entries (curve index, label as drawn, x, y).
    legend: Vec<(usize, String, i32, i32)>,
}

struct HeatLayout {
    frame: Rect,
    /// Top-left of the first cell.
    cells_x: i32,
    cells_y: i32,
    cell_w: i32,
    /// Width of the heatmap's slot in the grid (its title may use all of it).
    slot_w: i32,
    /// Text scale of the values (None: cells too narrow to print them).
    value_scale: Option<i32>,
}

impl HeatLayout {
    fn cell(&self, row: usize, col: usize) -> Rect {
        Rect {
            x: self.cells_x + col as i32 * self.cell_w,
            y: self.cells_y + row as i32 * CELL_H,
            w: self.cell_w,
            h: CELL_H,
        }
    }
}

struct Layout {
    width: i32,
    height: i32,
    panels: Vec<PanelLayout>,
    heatmaps: Vec<HeatLayout>,
}

const CONTENT_W: i32 = WIDTH - 2 * MARGIN;
const TITLE_H: i32 = GLYPH * TITLE_SCALE + 20;
const LINE_H: i32 = GLYPH * TEXT_SCALE;

fn data_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

fn panel_layout(panel: &LinePanel, x: i32, y: i32, w: i32) -> PanelLayout {
    let points = || panel.curves.iter().flat_map(|c| c.points.iter());
    let (ymin, ymax) = data_range(points().map(|p| p.1));
    let (xmin, xmax) = data_range(points().map(|p| p.0));
    let y_axis = Axis::fitting(ymin, ymax, PLOT_H, |_| LINE_H);
    let tick_w = y_axis
        .labels
        .iter()
        .map(|l| text_width(l, TEXT_SCALE))
        .max()
        .unwrap_or(0);
    let plot_x = x + LINE_H + 10 + tick_w + 10;
    let plot_w = (x + w - 12 - plot_x).max(40);
    let x_axis = Axis::fitting(xmin, xmax, plot_w, |l| text_width(l, TEXT_SCALE));
    let plot = Rect {
        x: plot_x,
        y: y + LINE_H + 18,
        w: plot_w,
        h: PLOT_H,
    };
    // legend: entries flow left to right below the x label, wrapping at the panel's right edge
    let mut legend = Vec::with_capacity(panel.curves.len());
    let legend_top = plot.y + plot.h + 8 + LINE_H + 8 + LINE_H + 14;
    let (left, right) = (x + LINE_H + 10, x + w - 12);
    let (mut lx, mut ly) = (left, legend_top);
    for (i, c) in panel.curves.iter().enumerate() {
        let label = fit(&c.label, TEXT_SCALE, right - left - LEGEND_SWATCH - 8);
        let entry_w = LEGEND_SWATCH + 8 + text_width(&label, TEXT_SCALE);
        if lx > left && lx + entry_w > right {
            lx = left;
            ly += LEGEND_ROW_H;
        }
        legend.push((i, label, lx, ly));
        lx += entry_w + 36;
    }
    let bottom = legend.last().map_or(legend_top, |l| l.3 + LEGEND_ROW_H);
    PanelLayout {
        frame: Rect {
            x,
            y,
            w,
            h: bottom - y,
        },
        plot,
        x_axis,
        y_axis,
        legend,
    }
}

fn row_label_width(h: &Heatmap) -> i32 {
    h.row_labels
        .iter()
        .map(|l| text_width(&fit(l, TEXT_SCALE, MAX_LABEL_CHARS as i32 * 16), TEXT_SCALE))
        .max()
        .unwrap_or(0)
        + 12
}

/// Cell width that fits "0.00" at text scale 2 with some air.
const VALUE_CELL_W: i32 = 4 * GLYPH * TEXT_SCALE + 12;

fn heat_layout(h: &Heatmap, x: i32, y: i32, w: i32) -> HeatLayout {
    let cols = h.col_labels.len().max(1) as i32;
    let label_w = row_label_width(h);
    let cell_w = ((w - label_w) / cols).clamp(1, MAX_CELL_W);
    let scale = if cell_w >= VALUE_CELL_W {
        TEXT_SCALE
    } else {
        1
    };
    let value_scale = (cell_w >= 4 * GLYPH * scale + 4).then_some(scale);
    let cells_y = y + LINE_H + 10 + LINE_H + 6;
    HeatLayout {
        frame: Rect {
            x,
            y,
            w: label_w + cols * cell_w,
            h: cells_y - y + h.values.len() as i32 * CELL_H,
        },
        cells_x: x + label_w,
        cells_y,
        cell_w,
        slot_w: w,
        value_scale,
    }
}

fn layout(panels: &[LinePanel], heatmaps: &[Heatmap]) -> Layout {
    let mut y = MARGIN + TITLE_H;
    let mut panel_layouts = Vec::with_capacity(panels.len());
    if !panels.is_empty() {
        let per_row = panels.len().min(PANELS_PER_ROW) as i32;
        let w = (CONTENT_W - (per_row - 1) * GAP) / per_row;
        for row in panels.chunks(PANELS_PER_ROW) {
            let start = panel_layouts.len();
            for (i, p) in row.iter().enumerate() {
                panel_layouts.push(panel_layout(p, MARGIN + i as i32 * (w + GAP), y, w));
            }
            let row_h = panel_layouts[start..]
                .iter()
                .map(|p| p.frame.h)
                .max()
                .unwrap_or(0);
            y += row_h + GAP;
        }
    }
    let mut heat_layouts = Vec::with_capacity(heatmaps.len());
    if !heatmaps.is_empty() {
        // as many heatmaps per row as fit with value-sized cells (at least one)
        let need = heatmaps
            .iter()
            .map(|h| row_label_width(h) + h.col_labels.len() as i32 * VALUE_CELL_W)
            .max()
            .unwrap_or(0);
        let mut per_row = heatmaps.len();
        while per_row > 1 && per_row as i32 * need + (per_row as i32 - 1) * GAP > CONTENT_W {
            per_row -= 1;
        }
        let w = (CONTENT_W - (per_row as i32 - 1) * GAP) / per_row as i32;
        for row in heatmaps.chunks(per_row) {
            let start = heat_layouts.len();
            for (i, h) in row.iter().enumerate() {
                heat_layouts.push(heat_layout(h, MARGIN + i as i32 * (w + GAP), y, w));
            }
            let row_h = heat_layouts[start..]
                .iter()
                .map(|h| h.frame.h)
                .max()
                .unwrap_or(0);
            y += row_h + GAP;
        }
    }
    Layout {
        width: WIDTH,
        height: y - GAP + MARGIN,
        panels: panel_layouts,
        heatmaps: heat_layouts,
    }
}

/// Width and height in pixels of the figure [`render_png`] draws for this content.
pub fn figure_size(panels: &[LinePanel], heatmaps: &[Heatmap]) -> (u32, u32) {
    let l = layout(panels, heatmaps);
    (l.width as u32, l.height as u32)
}

// ---------------------------------------------------------------------------------------------
// validation

fn validate(path: &Path, panels: &[LinePanel], heatmaps: &[Heatmap]) -> Result<(), String> {
    if panels.is_empty() && heatmaps.is_empty() {
        return Err("nothing to plot: no line panels and no heatmaps".into());
    }
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        return Err(format!(
            "{}: the file name must end in .png",
            path.display()
        ));
    }
    for p in panels {
        for c in &p.curves {
            if let Some((i, pt)) = c
                .points
                .iter()
                .enumerate()
                .find(|(_, (x, y))| !x.is_finite() || !y.is_finite())
            {
                return Err(format!(
                    "panel '{}', curve '{}': non-finite point {pt:?} at index {i}",
                    p.title, c.label
                ));
            }
        }
    }
    for h in heatmaps {
        let cols = h.col_labels.len();
        if h.values.is_empty() || cols == 0 {
            return Err(format!("heatmap '{}' has no rows or no columns", h.title));
        }
        if h.row_labels.len() != h.values.len() {
            return Err(format!(
                "heatmap '{}' has {} rows but {} row labels",
                h.title,
                h.values.len(),
                h.row_labels.len()
            ));
        }
        for (r, row) in h.values.iter().enumerate() {
            if row.len() != cols {
                return Err(format!(
                    "heatmap '{}' is ragged: row {r} has {} values, expected {cols} (one per column label)",
                    h.title,
                    row.len()
                ));
            }
            if let Some(v) = row.iter().find(|v| !v.is_finite()) {
                return Err(format!(
                    "heatmap '{}': non-finite value {v} in row {r}",
                    h.title
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// drawing

/// Renders a figure: a title line, then the line panels in rows of up to three (axes with
/// numeric tick labels, a legend with distinct colours), then the heatmaps in a grid (cell
/// colour from the value, the value printed with 2 decimals where the cell is wide enough,
/// row/column labels). Creates parent directories.
///
/// Errors for a path that is not a `.png` or cannot be written, no panels and no heatmaps,
/// heatmaps that are empty, ragged or whose label counts do not match, and non-finite values.
pub fn render_png(
    path: &Path,
    title: &str,
    panels: &[LinePanel],
    heatmaps: &[Heatmap],
) -> Result<(), String> {
    validate(path, panels, heatmaps)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    }
    let l = layout(panels, heatmaps);
    let root = BitMapBackend::new(path, (l.width as u32, l.height as u32)).into_drawing_area();
    root.fill(&BACKGROUND).map_err(draw_err)?;
    let title = fit(title, TITLE_SCALE, CONTENT_W);
    let tx = (l.width - text_width(&title, TITLE_SCALE)) / 2;
    draw_text(&root, tx, MARGIN, &title, TITLE_SCALE, &INK)?;
    for (p, pl) in panels.iter().zip(&l.panels) {
        draw_panel(&root, p, pl)?;
    }
    for (h, hl) in heatmaps.iter().zip(&l.heatmaps) {
        draw_heatmap(&root, h, hl)?;
    }
    root.present()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn draw_panel(area: &Area, p: &LinePanel, l: &PanelLayout) -> Result<(), String> {
    let plot = l.plot;
    let px = |x: f64| plot.x + (l.x_axis.frac(x) * plot.w as f64).round() as i32;
    let py = |y: f64| plot.y + plot.h - (l.y_axis.frac(y) * plot.h as f64).round() as i32;

    let title = fit(&p.title, TEXT_SCALE, l.frame.w);
    // centred over the plot, but never past the panel's edges
    let tw = text_width(&title, TEXT_SCALE);
    let tx = (plot.x + (plot.w - tw) / 2).clamp(l.frame.x, l.frame.x + l.frame.w - tw);
    draw_text(area, tx, l.frame.y, &title, TEXT_SCALE, &INK)?;

    // grid lines and tick labels
    for (v, label) in l.y_axis.ticks() {
        let y = py(v);
        line(area, vec![(plot.x, y), (plot.x + plot.w, y)], &GRID, 1)?;
        line(area, vec![(plot.x - 5, y), (plot.x, y)], &FRAME, 1)?;
        let w = text_width(label, TEXT_SCALE);
        draw_text(
            area,
            plot.x - 8 - w,
            y - LINE_H / 2,
            label,
            TEXT_SCALE,
            &MUTED,
        )?;
    }
    for (v, label) in l.x_axis.ticks() {
        let x = px(v);
        line(area, vec![(x, plot.y), (x, plot.y + plot.h)], &GRID, 1)?;
        line(
            area,
            vec![(x, plot.y + plot.h), (x, plot.y + plot.h + 5)],
            &FRAME,
            1,
        )?;
        let w = text_width(label, TEXT_SCALE);
        let lx = (x - w / 2).min(plot.x + plot.w + 10 - w).max(plot.x - 8);
        draw_text(area, lx, plot.y + plot.h + 8, label, TEXT_SCALE, &MUTED)?;
    }
    let (r, b) = (plot.x + plot.w, plot.y + plot.h);
    line(
        area,
        vec![
            (plot.x, plot.y),
            (r, plot.y),
            (r, b),
            (plot.x, b),
            (plot.x, plot.y),
        ],
        &FRAME,
        1,
    )?;

    // axis labels
    let xl = fit(&p.x_label, TEXT_SCALE, plot.w);
    let xl_y = plot.y + plot.h + 8 + LINE_H + 8;
    draw_text(
        area,
        plot.x + (plot.w - text_width(&xl, TEXT_SCALE)) / 2,
        xl_y,
        &xl,
        TEXT_SCALE,
        &INK,
    )?;
    let yl = fit(&p.y_label, TEXT_SCALE, plot.h);
    let yl_bottom = plot.y + (plot.h + text_width(&yl, TEXT_SCALE)) / 2;
    draw_text_vertical(area, l.frame.x, yl_bottom, &yl, TEXT_SCALE, &INK)?;

    // curves (markers too when sparse, so single points are visible)
    for (i, c) in p.curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(i32, i32)> = c.points.iter().map(|&(x, y)| (px(x), py(y))).collect();
        if pts.len() > 1 {
            line(area, pts.clone(), &color, 2)?;
        }
        if pts.len() <= 40 {
            for &(x, y) in &pts {
                fill_rect(
                    area,
                    Rect {
                        x: x - 2,
                        y: y - 2,
                        w: 4,
                        h: 4,
                    },
                    &color,
                )?;
            }
        }
    }

    // legend
    for (i, label, x, y) in &l.legend {
        let color = PALETTE[i % PALETTE.len()];
        let mid = y + LINE_H / 2;
        line(area, vec![(*x, mid), (x + LEGEND_SWATCH, mid)], &color, 3)?;
        draw_text(area, x + LEGEND_SWATCH + 8, *y, label, TEXT_SCALE, &INK)?;
    }
    Ok(())
}

/// A white-to-dark-blue sequential colour for `v` in [0, 1] (clamped).
fn heat_color(v: f64) -> RGBColor {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [247.0, 251.0, 255.0]),
        (0.25, [198.0, 219.0, 239.0]),
        (0.5, [107.0, 174.0, 214.0]),
        (0.75, [33.0, 113.0, 181.0]),
        (1.0, [8.0, 48.0, 107.0]),
    ];
    let v = v.clamp(0.0, 1.0);
    let k = STOPS.iter().position(|s| v <= s.0).unwrap_or(4).max(1);
    let ((a, ca), (b, cb)) = (STOPS[k - 1], STOPS[k]);
    let t = (v - a) / (b - a);
    let mix = |i: usize| (ca[i] + (cb[i] - ca[i]) * t).round() as u8;
    RGBColor(mix(0), mix(1), mix(2))
}

fn draw_heatmap(area: &Area, h: &Heatmap, l: &HeatLayout) -> Result<(), String> {
    let title = fit(&h.title, TEXT_SCALE, l.slot_w);
    draw_text(area, l.frame.x, l.frame.y, &title, TEXT_SCALE, &INK)?;
    for (c, label) in h.col_labels.iter().enumerate() {
        let cell = l.cell(0, c);
        // the normal size when the label fits the cell, else the small one (cut if need be)
        let s = if text_width(label, TEXT_SCALE) <= cell.w - 4 {
            TEXT_SCALE
        } else {
            1
        };
        let label = fit(label, s, cell.w - 4);
        let x = cell.x + (cell.w - text_width(&label, s)) / 2;
        draw_text(
            area,
            x,
            l.cells_y - LINE_H - 6 + (LINE_H - GLYPH * s),
            &label,
            s,
            &MUTED,
        )?;
    }
    for (r, row) in h.values.iter().enumerate() {
        let cell = l.cell(r, 0);
        let label = fit(&h.row_labels[r], TEXT_SCALE, MAX_LABEL_CHARS as i32 * 16);
        let y = cell.y + (CELL_H - LINE_H) / 2;
        let x = l.cells_x - 12 - text_width(&label, TEXT_SCALE);
        draw_text(area, x, y, &label, TEXT_SCALE, &INK)?;
        for (c, &v) in row.iter().enumerate() {
            let cell = l.cell(r, c);
            // a 1 px white gap between cells
            let inner = Rect {
                x: cell.x + 1,
                y: cell.y + 1,
                w: cell.w - 2,
                h: cell.h - 2,
            };
            fill_rect(area, inner, &heat_color(v))?;
            if let Some(vs) = l.value_scale {
                let text = format!("{v:.2}");
                let ink = if v > 0.55 { WHITE } else { INK };
                let x = cell.x + (cell.w - text_width(&text, vs)) / 2;
                let y = cell.y + (CELL_H - GLYPH * vs) / 2;
                draw_text(area, x, y, &text, vs, &ink)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir()
                .join(format!("moe-plot-{name}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn curve(label: &str, f: impl Fn(f64) -> f64, n: usize) -> Curve {
        Curve {
            label: label.into(),
            points: (0..n).map(|i| (i as f64 * 10.0, f(i as f64))).collect(),
        }
    }

    fn panels() -> Vec<LinePanel> {
        vec![
            LinePanel {
                title: "training loss".into(),
                x_label: "step".into(),
                y_label: "loss (nats)".into(),
                curves: vec![
                    curve("peer 0", |x| 4.0 * (-x / 30.0).exp() + 1.2, 100),
                    curve("peer 1", |x| 3.6 * (-x / 25.0).exp() + 1.3, 100),
                    curve("peer 2 (late)", |x| 3.0 * (-x / 20.0).exp() + 1.4, 60),
                ],
            },
            LinePanel {
                title: "validation loss per domain".into(),
                x_label: "step".into(),
                y_label: "loss".into(),
                curves: vec![
                    curve("arith", |x| 2.5 - x / 100.0, 20),
                    curve("code", |x| 2.8 - x / 90.0, 20),
                    curve("text", |x| 3.1 - x / 80.0, 20),
                ],
            },
            LinePanel {
                title: "MI(domain; expert)".into(),
                x_label: "step".into(),
                y_label: "bits".into(),
                curves: vec![
                    curve("layer 0", |x| 0.01 * x, 120),
                    curve("single", |_| 0.4, 1),
                ],
            },
        ]
    }

    fn heatmaps() -> Vec<Heatmap> {
        let rows = vec!["arith".to_string(), "code".into(), "text".into()];
        let cols: Vec<String> = (0..4).map(|e| format!("e{e}")).collect();
        vec![
            Heatmap {
                title: "layer 0".into(),
                row_labels: rows.clone(),
                col_labels: cols.clone(),
                values: vec![
                    vec![1.0, 0.0, 0.0, 0.0],
                    vec![0.1, 0.7, 0.1, 0.1],
                    vec![0.25, 0.25, 0.25, 0.25],
                ],
            },
            Heatmap {
                title: "layer 1".into(),
                row_labels: rows,
                col_labels: cols,
                values: vec![
                    vec![0.05, 0.85, 0.05, 0.05],
                    vec![0.0, 0.0, 0.5, 0.5],
                    vec![0.6, 0.1, 0.2, 0.1],
                ],
            },
        ]
    }

    fn decode(path: &Path) -> image::RgbImage {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8()
    }

    #[test]
    fn renders_a_png_of_the_expected_size_with_text_and_cells() {
        let dir = TempDir::new("full");
        let path = dir.0.join("nested/dir/figure.png");
        let (p, h) = (panels(), heatmaps());
        render_png(&path, "moe-trainer: 3 peers, skew 0.8", &p, &h).unwrap();
        let img = decode(&path);
        let (w, ht) = figure_size(&p, &h);
        assert_eq!((img.width(), img.height()), (w, ht));
        assert_eq!(w, 1400);

        // title text: dark pixels in the title band
        let dark = |x: u32, y: u32| img.get_pixel(x, y).0.iter().all(|&c| c < 100);
        let title_band = (MARGIN as u32..(MARGIN + GLYPH * TITLE_SCALE) as u32)
            .flat_map(|y| (0..w).map(move |x| (x, y)));
        assert!(title_band.filter(|&(x, y)| dark(x, y)).count() > 200);

        // heatmap cells: 1.0 (layer 0, row 0, col 0) versus 0.0 (row 0, col 1), sampled away
        // from the printed value
        let l = layout(&p, &h);
        let sample = |r: Rect| *img.get_pixel((r.x + 4) as u32, (r.y + 4) as u32);
        let hot = sample(l.heatmaps[0].cell(0, 0));
        let cold = sample(l.heatmaps[0].cell(0, 1));
        assert_ne!(hot, cold);
        assert_eq!(hot.0, [8, 48, 107]);
        assert_eq!(cold.0, [247, 251, 255]);
        // the value is printed inside the cell: white text pixels in the dark cell
        let c = l.heatmaps[0].cell(0, 0);
        let white_in_cell = (c.y + 2..c.y + c.h - 2)
            .flat_map(|y| (c.x + 2..c.x + c.w - 2).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x as u32, y as u32).0 == [255, 255, 255])
            .count();
        assert!(white_in_cell > 20, "{white_in_cell}");
        // curves are drawn in the first panel's plot area in the first palette colour
        let plot = l.panels[0].plot;
        let blue = (plot.y..plot.y + plot.h)
            .flat_map(|y| (plot.x..plot.x + plot.w).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x as u32, y as u32).0 == [31, 119, 180])
            .count();
        assert!(blue > 100, "{blue}");
    }

    #[test]
    fn heatmaps_only_and_panels_only() {
        let dir = TempDir::new("parts");
        let a = dir.0.join("heat.png");
        render_png(&a, "heatmaps", &[], &heatmaps()).unwrap();
        assert_eq!(decode(&a).dimensions(), figure_size(&[], &heatmaps()));
        let b = dir.0.join("lines.png");
        let mut p = panels();
        p.push(p[0].clone()); // a second row of panels
        render_png(&b, "lines", &p, &[]).unwrap();
        let img = decode(&b);
        assert_eq!(img.dimensions(), figure_size(&p, &[]));
        assert!(img.height() > figure_size(&panels(), &[]).1);
        // a panel without points and a wide heatmap with 16 experts still render
        let c = dir.0.join("edge.png");
        let empty = LinePanel {
            title: "empty".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            curves: vec![],
        };
        let wide = Heatmap {
            title: "16 experts".into(),
            row_labels: vec!["a".into()],
            col_labels: (0..16).map(|e| format!("expert{e}")).collect(),
            values: vec![(0..16).map(|e| e as f64 / 15.0).collect()],
        };
        let huge = LinePanel {
            title: "huge values".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            curves: vec![Curve {
                label: "big".into(),
                points: vec![(0.0, 1e25), (1e22, -1e25), (2e22, 3.0)],
            }],
        };
        render_png(&c, "edge", &[empty, huge], &[wide]).unwrap();
        decode(&c);
    }

    #[test]
    fn error_cases() {
        let dir = TempDir::new("errors");
        let ok = dir.0.join("x.png");
        let e = render_png(&ok, "t", &[], &[]).unwrap_err();
        assert!(e.contains("nothing to plot"), "{e}");

        let mut ragged = heatmaps();
        ragged[1].values[2].pop();
        let e = render_png(&ok, "t", &[], &ragged).unwrap_err();
        assert!(e.contains("ragged") && e.contains("layer 1"), "{e}");

        let mut labels = heatmaps();
        labels[0].row_labels.pop();
        assert!(render_png(&ok, "t", &[], &labels)
            .unwrap_err()
            .contains("row labels"));

        let mut nan = panels();
        nan[1].curves[2].points[3].1 = f64::NAN;
        let e = render_png(&ok, "t", &nan, &[]).unwrap_err();
        assert!(e.contains("non-finite") && e.contains("'text'"), "{e}");
        let mut inf = heatmaps();
        inf[0].values[0][0] = f64::INFINITY;
        assert!(render_png(&ok, "t", &[], &inf)
            .unwrap_err()
            .contains("non-finite"));

        // a parent "directory" that is a regular file cannot be created
        let file = dir.0.join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = render_png(&file.join("sub/fig.png"), "t", &panels(), &[]).unwrap_err();
        assert!(e.contains("cannot create directory"), "{e}");
        // the target is a directory: writing fails
        let as_dir = dir.0.join("d.png");
        std::fs::create_dir_all(&as_dir).unwrap();
        let e = render_png(&as_dir, "t", &panels(), &[]).unwrap_err();
        assert!(e.contains("cannot write"), "{e}");
        let e = render_png(&dir.0.join("fig.jpg"), "t", &panels(), &[]).unwrap_err();
        assert!(e.contains(".png"), "{e}");
        assert!(!ok.exists());
    }

    #[test]
    fn axis_ticks_are_nice() {
        let a = Axis::new(0.0, 990.0, 5);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 1000.0, 200.0));
        assert_eq!(a.labels, vec!["0", "200", "400", "600", "800", "1000"]);
        let a = Axis::new(1.23, 4.4, 6);
        assert_eq!(a.step, 0.5);
        assert_eq!(a.labels.first().map(String::as_str), Some("1.0"));
        assert_eq!(a.labels.last().map(String::as_str), Some("4.5"));
        let a = Axis::new(0.0, 20_000.0, 4);
        assert_eq!(a.labels, vec!["0k", "5k", "10k", "15k", "20k"]);
        // a constant series still gets a non-empty range
        let a = Axis::new(0.4, 0.4, 5);
        assert!(a.lo < 0.4 && a.hi > 0.4);
        let a = Axis::new(-0.3, 0.3, 6);
        assert!(a.labels.contains(&"0.0".to_string()));
        let a = Axis::new(0.0, 3e20, 5);
        assert!(a.labels.iter().all(|l| l.len() <= 9), "{:?}", a.labels);
        let a = Axis::new(1.0, 1.0 + 1e-9, 5);
        assert!(a.labels.iter().all(|l| l.len() <= 9), "{:?}", a.labels);
    }

    #[test]
    fn text_fitting_and_colors() {
        assert_eq!(fit("abcdef", 2, 64), "abc.");
        assert_eq!(fit("abcd", 2, 64), "abcd");
        assert_eq!(heat_color(0.0), RGBColor(247, 251, 255));
        assert_eq!(heat_color(1.0), RGBColor(8, 48, 107));
        assert_eq!(heat_color(2.0), heat_color(1.0));
        assert_eq!(heat_color(0.5), RGBColor(107, 174, 214));
    }

    /// Writes the demo figure to `$MOE_PLOT_DEMO` for a visual check
    /// (`MOE_PLOT_DEMO=/tmp/demo.png cargo test -p moe-trainer --lib demo -- --ignored`).
    #[test]
    #[ignore]
    fn demo() {
        let path =
            std::env::var("MOE_PLOT_DEMO").unwrap_or_else(|_| "/tmp/moe-plot-demo.png".into());
        render_png(
            Path::new(&path),
            "moe-trainer: 3 peers, skew 0.8",
            &panels(),
            &heatmaps(),
        )
        .unwrap();
        // edge cases: an empty panel, a lone panel and a 16-expert heatmap with long labels
        let empty = LinePanel {
            title: "no points yet".into(),
            x_label: "outer step".into(),
            y_label: "loss".into(),
            curves: vec![],
        };
        let wide = Heatmap {
            title: "layer 3: a 16-expert layer with a long title".into(),
            row_labels: vec!["arithmetic-domain".into(), "code".into()],
            col_labels: (0..16).map(|e| format!("expert{e}")).collect(),
            values: vec![
                (0..16).map(|e| e as f64 / 15.0).collect(),
                (0..16).map(|e| 1.0 - e as f64 / 15.0).collect(),
            ],
        };
        let mut lone = panels();
        lone.truncate(1);
        lone[0].curves.push(curve("flat", |_| 2.0, 100));
        let edge = path.replace(".png", "-edge.png");
        render_png(
            Path::new(&edge),
            "edge cases",
            &[empty, lone.remove(0)],
            &[wide, heatmaps().remove(0)],
        )
        .unwrap();
    }
}
