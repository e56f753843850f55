"""The benchmark suite of fused_resblock (see NOTES.md and ``python -m benchmarks.run --help``).

Modules, one job each: ``shapes`` (real ResNet layer and block shapes),
``workloads`` (the module and inputs a case runs), ``peers`` (ours and the
implementations we compare with), ``timing``, ``roofline`` (FLOPs, bytes,
measured peaks), ``matrix`` (which cases, in which order, within a budget),
``environment``, ``validate`` (the JSON schema), ``run`` (the driver) and
``report`` (plot and README table).
"""
