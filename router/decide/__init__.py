"""The router's pure decision code: scheduler, planner, perf model, workload estimate, plans.

Nothing here does I/O (no gRPC, Redis or HTTP; `tests/test_architecture.py` checks it): the live
router (router/live), the simulator (router/sim) and the tests call the same functions."""
