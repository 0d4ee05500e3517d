"""Benchmarks: `python -m l2fast.bench {penalty,train,infer} ...`."""
