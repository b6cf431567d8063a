"""Ray job entrypoint for incremental reindexing:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/reindex.py -o OUT [options]

Only parses arguments (the same ones as `rayindex reindex`) and calls the rayindex package.
"""

import sys

from rayindex.cli import app

if __name__ == "__main__":
    app(["reindex", *sys.argv[1:]], prog_name="reindex.py")
