{#
  Page loads per page per minute by event time (JetStream stored time): every page event counts as one
  load of its page; load time statistics over the events that carry load_ms. Incremental like
  gold_user_activity_1m.
#}
{{ config(alias='page_loads_1m', unique_key='window_start') }}

with events as (
    select * from {{ ref('silver_page_events') }}
    {{ incremental_filter('event_time', 'window_start', var('gold_lookback_minutes'), cap_at_now=true, grain='minute') }}
)

select
    date_trunc('minute', event_time) as window_start,
    date_trunc('minute', event_time) + interval 1 minute as window_end,
    page,
    count(*) as page_loads,
    count(distinct user_id) as users,
    avg(load_ms) as avg_load_ms,
    max(load_ms) as max_load_ms,
    max(_bronze_version) as bronze_version,
    now() as computed_at
from events
group by 1, 2, 3
