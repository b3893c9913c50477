"""Stage 6 — tracking (SwanLab, TensorBoard), the HTML report and its plots."""
