"""Where strategic-gram sets come from besides the presets: extracted from correct solutions
(Sec. 2.1, extraction.py), or placebo sets for the control (Sec. 5, placebo.py)."""
