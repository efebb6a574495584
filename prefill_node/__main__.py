from prefill_node.cli import main

raise SystemExit(main())
