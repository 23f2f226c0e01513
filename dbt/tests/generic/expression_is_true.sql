{# Every row of `model` satisfies the SQL boolean `expression`. #}
{% test expression_is_true(model, expression) %}
select * from {{ model }} where not ({{ expression }})
{% endtest %}
