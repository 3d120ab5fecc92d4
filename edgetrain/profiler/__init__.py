"""`edgetrain profile`: every training variant in its own clean process, its peak beside the
analytic floor (profile.py drives, worker.py trains one variant, step_cost.py counts)."""
