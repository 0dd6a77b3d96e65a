"""``python -m fairseq_knnvq`` prints the plugin folder, for ``common.user_dir=``."""

from . import PLUGIN_DIR

print(PLUGIN_DIR)
