from __future__ import annotations

import sys

from nodes.agent.main import main

sys.exit(main())
