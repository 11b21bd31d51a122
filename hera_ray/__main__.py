from hera_ray.cli import app

app(prog_name="hera")
