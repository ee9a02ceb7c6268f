"""Evaluation during and after training: held-out losses and validation videos (held_out.py, videos.py), and
the distilled-vs-teacher comparison of tools/distill_report.py (distill_report.py)."""
