"""What every handler needs: the configuration, one etcd client per cluster
and the Slack settings; built once at start-up."""
from __future__ import annotations

from dataclasses import dataclass, field

from bot.config import ClusterConfig, Config
from bot.etcd import EtcdClient, client_for
from bot.settings import SlackSettings


@dataclass
class BotContext:
    config: Config
    slack: SlackSettings
    clients: dict[str, EtcdClient] = field(default_factory=dict)

    def client(self, cluster: ClusterConfig) -> EtcdClient:
        """One long-lived client per cluster, so channels are reused."""
        client = self.clients.get(cluster.name)
        if client is None:
            client = self.clients[cluster.name] = client_for(cluster)
        return client

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()
