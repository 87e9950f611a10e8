"""coordexp_rl: teach vision-language models to detect objects by writing them as text.

Core layer: pure Python + torch algorithms (protocol, CoordExp, losses, matching, data, models).
Ray lives only in `actors/`, `learner/` and `coordexp_rl.launch`.
"""

__version__ = "0.1.0"
