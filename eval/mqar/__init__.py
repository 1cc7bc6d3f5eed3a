"""Multi-query associative recall (Zoology §3.2, Appendix E): data generator, 2-layer sweep model,
sweep harness and named sweep configurations. CLI: `python -m eval.mqar generate|sweep`."""
