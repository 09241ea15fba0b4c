"""One panel per technique family, plus Compare; each is a widget built from the app it belongs to."""

from widgets.panels.compare import ComparePanel
from widgets.panels.placeholder import PlaceholderPanel
from widgets.panels.quantize import QuantizePanel, build_config

__all__ = ["ComparePanel", "PlaceholderPanel", "QuantizePanel", "build_config"]
