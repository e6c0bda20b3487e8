"""``python3 -m corral.agent``"""

from corral.agent.main import main

raise SystemExit(main())
