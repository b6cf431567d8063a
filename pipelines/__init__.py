"""Not a package: pipelines/ is the source folder of the `rayindex` package (pipelines/rayindex/).
This file only turns `import pipelines` from the repository root into a clear error."""

raise ImportError(
    "pipelines/ holds the source of the rayindex package and is not importable itself: use `import rayindex`"
)
