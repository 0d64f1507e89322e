"""A site's answer to the server's data check: aggregate statistics, or why it keeps them.

The server's query carries the run's task config like a train message, so it is accepted
(no site paths, within the site's policy) and audited the same way
(:func:`~fedscan.client.task_policy.accept_task`). The statistics are
:class:`~fedscan.shared.data_stats.SiteStats`: aggregates, every group smaller than the
site's ``policy.data_stats_min_cases`` suppressed. A site whose policy says
``share_data_stats: false`` (the default for a site training with DP) answers with a fixed
reason code only.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from fedscan.client.site_log import say
from fedscan.client.task_policy import accept_task
from fedscan.shared.config import SiteConfig, effective_privacy
from fedscan.shared.data import read_site
from fedscan.shared.data_stats import site_stats
from fedscan.shared.messages import DATA_STATS, DATA_STATS_WITHHELD, SITE, site_record


def shares_data_stats(site: SiteConfig) -> bool:
    """The site's policy; unset: share without DP, keep them with DP."""
    if site.policy.share_data_stats is not None:
        return site.policy.share_data_stats
    return effective_privacy(site.privacy) is None


def answer_data_query(msg: Message, site: SiteConfig, echo: bool = True) -> Message:
    """The reply to a ``data-stats`` query: the site's name and its statistics (or a
    ``data-stats-withheld`` reason)."""
    cfg, _ = accept_task(msg, site)
    content = RecordDict({SITE: site_record(site.name)})
    if not shares_data_stats(site):
        say(site, f"[{site.name}] data check: statistics not shared (policy)", echo)
        content[DATA_STATS_WITHHELD] = ConfigRecord({"reason": "policy"})
        return Message(content=content, reply_to=msg)
    data = read_site(site, cfg.data, check=False)
    k = site.policy.data_stats_min_cases
    if len(data.cases) < k or cfg.data_check.max_cases < k:
        say(site, f"[{site.name}] data check: statistics not shared (fewer than {k} cases)",
            echo)
        content[DATA_STATS_WITHHELD] = ConfigRecord({"reason": "few-cases"})
        return Message(content=content, reply_to=msg)
    stats = site_stats(data.cases, cfg.data, min_cases=k, max_cases=cfg.data_check.max_cases)
    say(site, f"[{site.name}] data check: sent statistics of {stats.sampled} of "
              f"{stats.cases} cases", echo)
    content[DATA_STATS] = stats.to_record()
    return Message(content=content, reply_to=msg)
