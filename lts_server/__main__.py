import sys

from lts_server.cli.daemon import main

sys.exit(main())
