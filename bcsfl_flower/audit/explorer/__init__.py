"""The explorer page: a run's trail as one self-contained HTML file (``bcsfl audit report``)."""

from bcsfl_flower.audit.explorer.page import REPORT_FILE, WrittenReport, write_report

__all__ = ["REPORT_FILE", "WrittenReport", "write_report"]
