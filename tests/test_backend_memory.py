import pytest

from kvstore.backends import open_store
from kvstore.testing import StoreTests


class TestMemoryStore(StoreTests):
    @pytest.fixture
    async def store(self):
        async with open_store("memory://") as store:
            yield store
