"""`malt eval`: the Generator -> Verifier -> Refiner chain at test time, against single-model
baselines, with majority voting and optional per-role LoRA adapters.
"""
