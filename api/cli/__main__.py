"""`python -m api.cli`: the taskorch command."""

import sys

from api.cli.main import main

sys.exit(main())
