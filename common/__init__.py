"""viewssl common layer: geometry, data, evaluation and training infrastructure shared by ``ssv`` and ``trajssl``.

``common`` imports neither family; the families import it.
"""
__version__ = "0.1.0"
