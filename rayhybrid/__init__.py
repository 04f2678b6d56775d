"""rayhybrid: hybrid batch training and mono/cross/multilingual evaluation of dense retrievers on Ray.

Importing the package starts no Ray and imports no heavy optional dependency.
"""

__version__ = "0.1.0"
