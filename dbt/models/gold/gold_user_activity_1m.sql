{#
  Tumbling 1-minute windows per user id by event time (Kafka record time). Incremental: every run
  recomputes, from all of silver, each window from `gold_lookback_minutes` before the newest window
  (capped at now) onwards, and replaces those windows (delete+insert on window_start), so late rows
  within the lookback are counted. Later ones need `dbt build --full-refresh`.
#}
{{ config(alias='user_activity_1m', unique_key='window_start') }}

with events as (
    select * from {{ ref('silver_user_activity') }}
    {{ incremental_filter('event_time', 'window_start', var('gold_lookback_minutes'), cap_at_now=true, grain='minute') }}
)

select
    date_trunc('minute', event_time) as window_start,
    date_trunc('minute', event_time) + interval 1 minute as window_end,
    id,
    count(*) as event_count,
    cast(sum(value) as bigint) as total_value,
    max(_bronze_version) as bronze_version,  -- newest bronze Delta version among the window's rows
    now() as computed_at
from events
group by 1, 2, 3
