"""``python -m edge_node ...`` is ``hera edge ...``."""

from hera_ray.cli import edge_app

if __name__ == "__main__":
    edge_app(prog_name="python -m edge_node")
