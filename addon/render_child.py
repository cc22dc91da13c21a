"""Entry of the background Blender that renders a job's condition images (see background_render.py).

``blender -b --factory-startup --python render_child.py -- SPEC.json``: imports this add-on's package from the
folder named in the spec and calls ``background_render.child_main``. An exception exits non-zero with its
traceback on stderr, which the add-on logs.
"""
import importlib
import json
import sys
from pathlib import Path

spec = json.loads(Path(sys.argv[sys.argv.index("--") + 1]).read_text(encoding="utf-8"))
sys.path.insert(0, spec["package_parent"])
importlib.import_module(spec["package"] + ".background_render").child_main(spec)
