"""The live router process: tier queues in, dispatches out (service.py), requests resumed when
their group dies (recovery.py), the admin API (admin.py) and the `nitsum router` / `nitsum plan`
commands."""
