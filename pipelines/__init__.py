"""rayindex: build one FAISS index from a text corpus on Ray, and search it.

One module per stage; see docs/architecture.md for what each one does and which test covers it.
"""

__version__ = "0.1.0"
