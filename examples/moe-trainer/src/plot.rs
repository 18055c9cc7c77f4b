//! TEMPORARY stub (replaced from branch moe-aux).
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}
pub struct LinePanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub curves: Vec<Curve>,
}
pub struct Heatmap {
    pub title: String,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    pub values: Vec<Vec<f64>>,
}
pub fn render_png(
    _path: &std::path::Path,
    _title: &str,
    _panels: &[LinePanel],
    _heatmaps: &[Heatmap],
) -> Result<(), String> {
    Ok(())
}
