from __future__ import annotations

from rest_framework.pagination import LimitOffsetPagination


class Pagination(LimitOffsetPagination):
    """``?limit=&offset=``; 50 by default, at most 500 per page."""

    default_limit = 50
    max_limit = 500
