"""Ray job entrypoint for serving:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/serve_rag.py --index /shared/rayindex-data

Only parses arguments (the same ones as `rayindex serve`) and calls the rayindex package.
"""

import sys

from rayindex.cli import app

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]], prog_name="serve_rag.py")
