"""Ray job entrypoint for the build:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/build_index.py [build options]

Only parses arguments (the same ones as `rayindex build`) and calls the rayindex package.
"""

import sys

from rayindex.cli import app

if __name__ == "__main__":
    app(["build", *sys.argv[1:]], prog_name="build_index.py")
