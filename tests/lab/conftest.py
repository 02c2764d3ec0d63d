from tests.lab.fixtures import vmlab

__all__ = ["vmlab"]
