from decode_node.cli import main

raise SystemExit(main())
